"""The optimizer and learning-rate schedule of Llama 2's recipes (§2.2, §3.1).

AdamW with decoupled weight decay; the learning rate rises linearly over
``warmup`` steps to its peak, then follows a cosine down to
``min_lr_ratio * peak`` at the last step (the paper: 10% of the peak).
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim

from llama2_mlx.errors import OptionError


def lr_schedule(
    peak: float, total_steps: int, warmup: int = 0, min_lr_ratio: float = 0.1,
    kind: str = "cosine",
) -> Callable:
    """lr(step) for optimizer updates step = 0 .. total_steps-1 (an int or an mx.array).

    Warmup: ``peak * (step + 1) / warmup``; then ``kind`` = "cosine" (to the floor
    at the last step) or "constant" (stays at the peak).
    """
    if peak <= 0:
        raise OptionError("{lr} must be positive (got {peak})", peak=peak)
    if warmup < 0:
        raise OptionError("{warmup} must be >= 0 (got {got})", got=warmup)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise OptionError("{min_lr_ratio} must be in [0, 1] (got {got})", got=min_lr_ratio)
    if kind not in ("cosine", "constant"):
        raise OptionError("{schedule} must be cosine or constant (got {kind!r})", kind=kind)
    floor = peak * min_lr_ratio
    decay_steps = max(1, total_steps - warmup - 1)

    def lr(step):
        s = mx.array(step).astype(mx.float32)
        warm = peak * (s + 1) / max(warmup, 1)
        if kind == "constant":
            main = mx.array(peak, mx.float32)
        else:
            p = mx.clip((s - warmup) / decay_steps, 0.0, 1.0)
            main = floor + (peak - floor) * 0.5 * (1 + mx.cos(math.pi * p))
        return mx.where(s < warmup, warm, main)

    return lr


def make_optimizer(config, schedule: Callable) -> optim.AdamW:
    """AdamW with ``config``'s betas, eps and weight decay (any object with the TrainConfig
    fields) on the learning-rate ``schedule``."""
    return optim.AdamW(
        learning_rate=schedule, betas=list(config.betas), eps=config.eps,
        weight_decay=config.weight_decay,
    )
