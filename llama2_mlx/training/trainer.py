"""A generic training loop: whatever parameters of the model are trainable
(LoRA matrices on a frozen base, a reward head, or everything).

The loss function returns ``(loss_sum, count)`` for a batch: the summed loss
and the number of items it sums over (target tokens, preference pairs). The
gradients of the micro-batches of a step are summed and divided by the step's
total count, so gradient accumulation equals one large batch exactly.

Steps are optimizer updates. The data is a function ``epoch -> sequence of
batches`` (same length for every epoch); micro-batch ``m`` of the run is batch
``m % len`` of epoch ``m // len``, so a checkpoint at step ``s`` resumes at
micro-batch ``s * grad_accum``. Dropout is seeded per micro-batch, so a
resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.progress import ProgressBar, peak_memory_gb
from llama2_mlx.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from llama2_mlx.training.schedule import lr_schedule, make_optimizer

LossFn = Callable[[nn.Module, Any], tuple[mx.array, mx.array]]

# Settings a resumed run must share with its checkpoint (the rest may change);
# "warmup" is recorded as the run's warmup steps (warmup_ratio included).
RESUME_KEYS = ("lr", "warmup", "min_lr_ratio", "schedule", "weight_decay", "betas", "eps",
               "grad_accum", "seed", "total_steps", "batches_per_epoch")


@dataclass
class TrainConfig:
    """Optimizer, schedule, length, evaluation and checkpoint settings of a run.

    Give ``epochs`` or ``iters`` (optimizer steps); the learning rate warms up over
    ``warmup`` steps or, with ``warmup_ratio`` > 0, that share of the steps with
    ``warmup`` as the floor (never all of them: ``warmup=5, warmup_ratio=0.03`` is the
    paper's "3% of the steps, at least 5"); ``clip`` 0 disables clipping;
    ``val_every``/``save_every`` 0 disable periodic validation/checkpoints;
    checkpoints go to ``checkpoint_dir`` (none without it).

    The fields with a ``help`` are the training options of the commands (``lora-train``
    and the others): each default and help text is written here only.
    """

    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    warmup: int = field(default=0, metadata={"help": "Linear warmup steps."})
    warmup_ratio: float = 0.0
    min_lr_ratio: float = field(default=0.1, metadata={
        "help": "Cosine floor as a share of the peak."})
    schedule: str = "cosine"
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip: float = field(default=1.0, metadata={
        "help": "Clip gradients at this global norm (0: off)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    # Neither given: one epoch (__post_init__).
    epochs: Optional[float] = field(default=None, metadata={
        "help": "Epochs to train (instead of --iters)."})
    iters: Optional[int] = field(default=None, metadata={
        "help": "Optimizer steps to train (instead of --epochs)."})
    val_every: int = field(default=200, metadata={"help": "Validate every N steps (0: off)."})
    val_batches: int = field(default=25, metadata={"help": "Validation batches (-1: all)."})
    val_at_start: bool = True
    save_every: int = field(default=100, metadata={
        "help": "Checkpoint every N steps (0: at the end only)."})
    keep_checkpoints: int = 2
    checkpoint_dir: Optional[Path] = None
    resume: bool = field(default=False, metadata={
        "help": "Continue from the newest checkpoint of the output folder."})
    grad_checkpoint: bool = field(default=False, metadata={
        "help": "Recompute activations in backward (less memory)."})
    seed: int = field(default=0, metadata={
        "help": "Random seed (data order, initialization, dropout)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    description: str = "train"

    def __post_init__(self):
        if self.epochs is not None and self.iters is not None:
            raise Llama2Error("give --epochs or --iters, not both")
        if self.epochs is None and self.iters is None:
            self.epochs = 1
        if self.iters is not None and self.iters < 1:
            raise Llama2Error(f"--iters must be at least 1 (got {self.iters})")
        if self.epochs is not None and self.epochs <= 0:
            raise Llama2Error(f"--epochs must be positive (got {self.epochs})")
        if self.grad_accum < 1:
            raise Llama2Error(f"--grad-accum must be at least 1 (got {self.grad_accum})")
        if self.clip < 0:
            raise Llama2Error(f"--clip must be >= 0 (got {self.clip})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise Llama2Error(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")

    def micro_batches(self, per_epoch: int) -> int:
        """Micro-batches of the run, given ``per_epoch`` batches an epoch."""
        if self.iters is not None:
            return self.iters * self.grad_accum
        return math.ceil(self.epochs * per_epoch)

    def total_steps(self, per_epoch: int) -> int:
        """Optimizer steps of the run, given ``per_epoch`` batches an epoch."""
        return math.ceil(self.micro_batches(per_epoch) / self.grad_accum)

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps`` (see ``warmup_ratio``)."""
        if not self.warmup_ratio:
            return self.warmup
        steps = max(self.warmup, round(self.warmup_ratio * total_steps))
        return max(0, min(steps, total_steps - 1))


class StopTraining(Exception):
    """Raised by an ``on_step`` callback to end the run after the current step."""


@dataclass
class TrainResult:
    """What a run did: per-step losses and learning rates, validation losses, throughput."""

    steps: int = 0
    total_steps: int = 0
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    learning_rates: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_gb: float = 0.0
    last_checkpoint: Optional[Path] = None
    resumed_from: Optional[int] = None
    stopped: bool = False

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Iterable, max_batches: int = -1
) -> tuple[float, int]:
    """(mean loss, count) over ``batches`` (the first ``max_batches`` of them unless -1)."""
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0)
    for i, batch in enumerate(batches):
        if 0 <= max_batches <= i:
            break
        s, n = loss_fn(model, batch)
        total, count = total + s.astype(mx.float32), count + n
        mx.eval(total, count)
    model.train(was_training)
    n = int(count.item())
    return (total.item() / n if n else float("nan")), n


def set_grad_checkpoint(model: nn.Module, on: bool = True) -> None:
    """Recompute each transformer block in the backward pass (less memory, ~30% slower)."""
    for _, m in model.named_modules():
        if hasattr(m, "checkpoint_blocks"):
            m.checkpoint_blocks = on


def _restore_optimizer(optimizer: optim.Optimizer, model: nn.Module, flat: dict) -> None:
    optimizer.init(model.trainable_parameters())

    def pick(path, value):
        if path not in flat:
            raise Llama2Error(f"--resume: optimizer state has no entry {path}")
        return flat[path]

    optimizer.state = tree_map_with_path(pick, optimizer.state)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_batches: Callable[[int], Sequence],
    config: TrainConfig,
    *,
    val_batches: Optional[Callable[[], Iterable]] = None,
    on_save: Optional[Callable[[nn.Module, int], None]] = None,
    on_step: Optional[Callable[[int, dict], None]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``loss_fn`` over ``train_batches(epoch)``.

    ``val_batches()`` yields validation batches; ``on_save(model, step)`` writes
    the run's artefacts (called at each checkpoint and at the end);
    ``on_step(step, metrics)`` may raise ``StopTraining``. A non-finite loss or
    gradient norm raises ``Llama2Error`` before the update, leaving the last
    good checkpoint and artefacts untouched.
    """
    say = log or (lambda s: None)
    per_epoch = len(train_batches(0))
    if per_epoch == 0:
        raise Llama2Error("no training batches")
    ga = config.grad_accum
    total_micro, total_steps = config.micro_batches(per_epoch), config.total_steps(per_epoch)
    warmup = config.warmup_steps(total_steps)
    schedule = lr_schedule(config.lr, total_steps, warmup, config.min_lr_ratio, config.schedule)
    optimizer = make_optimizer(config, schedule)
    fingerprint = {
        **{k: getattr(config, k) for k in RESUME_KEYS if hasattr(config, k)}, "warmup": warmup,
        "betas": list(config.betas), "total_steps": total_steps, "batches_per_epoch": per_epoch,
    }
    result = TrainResult(total_steps=total_steps)
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None

    start = 0
    if config.resume:
        if ckpt_dir is None:
            raise Llama2Error("--resume needs a checkpoint folder")
        path, params, opt_state, state = load_checkpoint(ckpt_dir)
        for k, v in fingerprint.items():
            if state["fingerprint"].get(k) != v:
                raise Llama2Error(
                    f"--resume: {path} was made with {k}={state['fingerprint'].get(k)!r}, "
                    f"this run has {k}={v!r}"
                )
        want = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
        if set(params) != set(want) or any(params[k].shape != want[k] for k in want):
            odd = sorted(set(params) ^ set(want)) or [k for k in want if params[k].shape != want[k]]
            raise Llama2Error(f"--resume: {path} does not match this model's trainable "
                              f"parameters (first difference: {odd[0]})")
        model.load_weights(list(params.items()), strict=False)
        _restore_optimizer(optimizer, model, opt_state)
        start = state["step"]
        result.train_losses = [tuple(x) for x in state.get("train_losses", [])]
        result.learning_rates = [tuple(x) for x in state.get("learning_rates", [])]
        result.val_losses = [tuple(x) for x in state.get("val_losses", [])]
        result.resumed_from, result.last_checkpoint, result.steps = start, path, start
    elif ckpt_dir is not None and list_checkpoints(ckpt_dir):
        # A fresh run must not mix its checkpoints with an older run's.
        old = list_checkpoints(ckpt_dir)
        say(f"removing {len(old)} checkpoint(s) of an earlier run in {ckpt_dir} "
            "(--resume continues a run)")
        for p in old:
            shutil.rmtree(p, ignore_errors=True)

    if config.grad_checkpoint and any(
        isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in model.named_modules()
    ):
        # The backward pass recomputes each block and would draw other dropout masks.
        raise Llama2Error("--grad-checkpoint cannot be combined with dropout > 0")
    set_grad_checkpoint(model, config.grad_checkpoint)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def validate(step: int, bar: ProgressBar) -> None:
        if val_batches is None:
            return
        tic = time.perf_counter()
        loss, n = evaluate(model, loss_fn, val_batches(), config.val_batches)
        result.val_losses.append((step, loss))
        bar.log(f"step {step}: val loss {loss:.4f} ({n} targets, {time.perf_counter() - tic:.1f}s)")

    def checkpoint(step: int, bar: ProgressBar) -> None:
        if ckpt_dir is not None:
            state = {
                "fingerprint": fingerprint, "micro_batch": step * ga,
                "epoch": (step * ga) // per_epoch, "batch_in_epoch": (step * ga) % per_epoch,
                "seed": config.seed, "train_losses": result.train_losses,
                "learning_rates": result.learning_rates, "val_losses": result.val_losses,
            }
            params = dict(tree_flatten(model.trainable_parameters()))
            result.last_checkpoint = save_checkpoint(
                ckpt_dir, step, params, optimizer.state, state, config.keep_checkpoints
            )
        if on_save is not None:
            on_save(model, step)

    model.train()
    epoch_cache: dict[int, Sequence] = {}

    def micro_batch(m: int):
        e = m // per_epoch
        if e not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[e] = train_batches(e)
            if len(epoch_cache[e]) != per_epoch:
                raise Llama2Error(f"epoch {e} has {len(epoch_cache[e])} batches, not {per_epoch}")
        return epoch_cache[e][m % per_epoch]

    mx.reset_peak_memory()
    columns = ("loss {loss}", "lr {lr}", "{tps} tok/s", "peak {mem} GB")
    with ProgressBar(config.description, total_steps, columns, completed=start,
                     enabled=config.progress) as bar:
        if start == 0 and config.val_every > 0 and config.val_at_start:
            validate(0, bar)
        tic = time.perf_counter()
        for step in range(start, total_steps):
            grads, loss_sum, count, tokens = None, mx.array(0.0), mx.array(0), 0
            for m in range(step * ga, min((step + 1) * ga, total_micro)):
                batch = micro_batch(m)
                mx.random.seed(config.seed * 1_000_003 + m)  # dropout: same on resume
                (s, n), g = loss_and_grad(model, batch)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum, count = loss_sum + s.astype(mx.float32), count + n
                mx.eval(grads, loss_sum, count)
                tokens += int(getattr(batch, "num_tokens", 0) or int(n))
            n_items = max(int(count.item()), 1)
            loss = loss_sum.item() / n_items
            grads = tree_map(lambda g: g / n_items, grads)
            if config.clip > 0:
                grads, norm = optim.clip_grad_norm(grads, config.clip)
            else:
                norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
            norm = norm.item()
            if not (math.isfinite(loss) and math.isfinite(norm)):
                what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
                kept = result.last_checkpoint or "none (no checkpoint was written yet)"
                raise Llama2Error(
                    f"training diverged at step {step + 1}: {what}; stopped before the update, "
                    f"last good checkpoint: {kept}"
                )
            lr = schedule(step).item()
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)
            done = step + 1
            elapsed = time.perf_counter() - tic
            result.seconds += elapsed
            result.tokens += tokens
            result.steps = done
            result.train_losses.append((done, loss))
            result.learning_rates.append((done, lr))
            bar.update(done, loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                       tps=f"{tokens / elapsed if elapsed else 0:,.0f}",
                       mem=f"{peak_memory_gb():.2f}")
            if val_batches is not None and config.val_every > 0 and (
                done % config.val_every == 0 or done == total_steps
            ):
                validate(done, bar)
            stop = False
            if on_step is not None:
                try:
                    on_step(done, {"loss": loss, "lr": lr, "grad_norm": norm, "tokens": tokens})
                except StopTraining:
                    stop = True
            if done == total_steps or (config.save_every > 0 and done % config.save_every == 0):
                checkpoint(done, bar)
            if stop:
                result.stopped = True
                break
            tic = time.perf_counter()
    result.peak_memory_gb = peak_memory_gb()
    resumed = f" (resumed at step {start} of {total_steps})" if config.resume else ""
    say(
        f"trained {result.steps - start} steps{resumed} in {result.seconds:.1f}s, "
        f"{result.tokens_per_sec:,.0f} tokens/s, peak memory {result.peak_memory_gb:.2f} GB"
    )
    return result
