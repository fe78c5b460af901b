"""Samplers and logits processors for generation.

A sampler maps log-probabilities (or logits) of shape (B, V) to token ids (B,).
A logits processor maps (tokens so far, logits (B, V)) to new logits.

Filters follow Meta's ``generation.py``: the temperature is applied first and
the nucleus (top-p) is taken on the tempered distribution.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx

from llama2_mlx.errors import OptionError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    """The most likely token of each row."""
    return mx.argmax(logprobs, axis=-1)


def _check(temp: float, top_p: float, top_k: int, min_p: float) -> None:
    if temp < 0:
        raise OptionError("{temp} must be >= 0, got {got}", got=temp)
    if not 0 < top_p <= 1:
        raise OptionError("{top_p} must be in (0, 1], got {got}", got=top_p)
    if top_k < 0 or int(top_k) != top_k:
        raise OptionError("{top_k} must be a non-negative integer, got {got}", got=top_k)
    if not 0 <= min_p <= 1:
        raise OptionError("{min_p} must be in [0, 1], got {got}", got=min_p)


def make_sampler(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Sampler:
    """A sampler for (B, V) log-probabilities or logits, returning (B,) token ids.

    ``temp == 0`` is greedy (argmax). Otherwise the scores are divided by
    ``temp`` and renormalised, then filtered in this order: ``top_k`` (keep the
    k most likely; 0 = off), ``top_p`` (Meta's nucleus on the renormalised
    distribution: sort descending and drop tokens whose preceding mass already
    exceeds p, i.e. ``cumsum - prob > p``; 1 = off), ``min_p`` (drop tokens
    below ``min_p`` times the top probability; 0 = off); the survivors are
    renormalised and one token per row is drawn from ``mx.random``.
    """
    _check(temp, top_p, top_k, min_p)
    if temp == 0:
        return greedy
    inv_temp = 1.0 / temp
    if top_p >= 1 and top_k == 0 and min_p == 0:
        return lambda x: mx.random.categorical(x.astype(mx.float32) * inv_temp, axis=-1)
    log_min_p = math.log(min_p) if min_p > 0 else None

    def sample(x: mx.array) -> mx.array:
        order, s, keep = _sorted_kept(x, inv_temp, top_p, top_k, log_min_p)
        idx = mx.random.categorical(mx.where(keep, s, -mx.inf), axis=-1)
        return mx.take_along_axis(order, mx.expand_dims(idx, -1), axis=-1).squeeze(-1)

    return sample


def _sorted_kept(x: mx.array, inv_temp: float, top_p: float, top_k: int, log_min_p):
    """The tempered scores sorted descending: (order, log-probabilities, which are kept)."""
    x = x.astype(mx.float32) * inv_temp
    order = mx.argsort(-x, axis=-1)  # descending
    s = mx.take_along_axis(x, order, axis=-1)
    s = s - mx.logsumexp(s, axis=-1, keepdims=True)
    keep = mx.ones(s.shape, dtype=mx.bool_)
    if 0 < top_k < s.shape[-1]:
        keep = mx.arange(s.shape[-1]) < top_k
    if top_p < 1:
        p = mx.where(keep, mx.exp(s), 0.0)
        p = p / p.sum(axis=-1, keepdims=True)
        keep = keep & (mx.cumsum(p, axis=-1) - p <= top_p)
    if log_min_p is not None:
        keep = keep & (s >= s[..., :1] + log_min_p)
    return order, s, keep


def make_filter(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Optional[Callable[[mx.array], mx.array]]:
    """The distribution ``make_sampler(temp, top_p, top_k, min_p)`` draws from: a map of
    (B, V) log-probabilities (or logits) to the (B, V) log-probabilities of each token
    being drawn (``-inf``: never), in vocabulary order. None for greedy (``temp == 0``).

    Speculative decoding's accept/reject rule needs these probabilities, not just a draw.
    """
    _check(temp, top_p, top_k, min_p)
    if temp == 0:
        return None
    inv_temp = 1.0 / temp
    if top_p >= 1 and top_k == 0 and min_p == 0:
        def tempered(x: mx.array) -> mx.array:
            x = x.astype(mx.float32) * inv_temp
            return x - mx.logsumexp(x, axis=-1, keepdims=True)

        return tempered
    log_min_p = math.log(min_p) if min_p > 0 else None

    def filtered(x: mx.array) -> mx.array:
        order, s, keep = _sorted_kept(x, inv_temp, top_p, top_k, log_min_p)
        s = mx.where(keep, s, -mx.inf)
        s = s - mx.logsumexp(s, axis=-1, keepdims=True)
        return mx.take_along_axis(s, mx.argsort(order, axis=-1), axis=-1)  # back to id order

    return filtered


def make_repetition_penalty(penalty: float, context_size: Optional[int] = 20) -> LogitsProcessor:
    """CTRL's repetition penalty (Keskar et al. 2019), as in Hugging Face and mlx-lm.

    Logits of tokens among the last ``context_size`` ids (None = all) are
    divided by ``penalty`` when positive and multiplied by it when negative.
    ``tokens`` is (T,) for every row or (B, T) per row.
    """
    if not penalty > 0:
        raise OptionError("{repetition_penalty} must be > 0, got {got}", got=penalty)
    if context_size is not None and context_size < 1:
        raise OptionError("{repetition_context_size} must be >= 1, got {got}", got=context_size)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        ctx = tokens if context_size is None else tokens[..., -context_size:]
        if ctx.ndim == 1:
            ctx = mx.broadcast_to(ctx, (logits.shape[0], ctx.shape[0]))
        sel = mx.take_along_axis(logits, ctx, axis=-1)
        sel = mx.where(sel < 0, sel * penalty, sel / penalty)
        # Repeated ids write the same value twice: harmless.
        return mx.put_along_axis(logits, ctx, sel, axis=-1)

    return process


def make_logits_processors(
    repetition_penalty: Optional[float] = None, context_size: Optional[int] = 20
) -> list[LogitsProcessor]:
    """The processors for these options (an empty list when none is active)."""
    if repetition_penalty is None or repetition_penalty == 1.0:
        return []
    return [make_repetition_penalty(repetition_penalty, context_size)]
