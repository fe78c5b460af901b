"""Per-layer KV caches, created outside the model and passed to ``Transformer.__call__``.

Keys and values are stored as (B, n_kv_heads, T, head_dim): with grouped-query
attention the KV heads are never repeated in memory.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx


class KVCache:
    """A growing cache (in steps of ``step`` tokens).

    ``left_padding`` (one int per sequence) makes it a batched cache for prompts
    of different lengths, left-padded to a common length: padding keys are
    masked out for every query.
    """

    step = 256

    def __init__(self, left_padding: Optional[Sequence[int]] = None):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.left_padding = None if left_padding is None else mx.array(list(left_padding))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, T, D = keys.shape
        prev = self.offset
        if self.keys is None or prev + T > self.keys.shape[2]:
            grow = ((T + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[-1]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.keys[..., prev : prev + T, :] = keys
        self.values[..., prev : prev + T, :] = values
        self.offset += T
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, T: int):
        """Mask for the next T queries against the cached keys plus those T."""
        if self.left_padding is None:
            return "causal" if T > 1 else None
        qpos = mx.arange(self.offset, self.offset + T)[:, None]
        kpos = mx.arange(self.offset + T)[None]
        pad = self.left_padding[:, None, None, None]
        # A padding query sees itself, so its softmax row is never empty (no NaN).
        return (kpos <= qpos) & ((kpos >= pad) | (kpos == qpos))  # (B, 1, T, offset+T)

    def expand(self, n: int) -> None:
        """Repeat a batch-1 cache n times (K samples sharing one prefilled prompt)."""
        self.keys = mx.repeat(self.keys[..., : self.offset, :], n, axis=0)
        self.values = mx.repeat(self.values[..., : self.offset, :], n, axis=0)
        if self.left_padding is not None:
            self.left_padding = mx.repeat(self.left_padding, n, axis=0)

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held for the cached tokens."""
        if self.keys is None:
            return 0
        B, H, _, D = self.keys.shape
        return 2 * B * H * self.offset * D * self.keys.dtype.size

    @property
    def capacity_nbytes(self) -> int:
        """Bytes allocated (the cached tokens rounded up to the growth step)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class BoundedKVCache:
    """A cache that never holds more than ``max_size`` tokens.

    It keeps the first ``keep`` tokens (attention sinks) and a sliding window
    of the most recent ``max_size - keep``; each query attends to exactly
    those. Keys are stored already rotated, so kept tokens keep their positions.
    """

    def __init__(self, max_size: int, keep: int = 4):
        if max_size <= keep:
            raise ValueError(f"max_kv_size {max_size} must be larger than keep={keep}")
        self.max_size, self.keep = max_size, keep
        self.window = max_size - keep
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # absolute position of the next token

    @property
    def size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _trim(self, n: int) -> None:
        # Keep the sinks and the most recent n - keep tokens.
        if self.size > n:
            tail = n - self.keep
            self.keys = mx.concatenate([self.keys[..., : self.keep, :], self.keys[..., -tail:, :]], 2)
            self.values = mx.concatenate(
                [self.values[..., : self.keep, :], self.values[..., -tail:, :]], 2
            )

    def _key_positions(self, T: int) -> mx.array:
        S = self.size
        if S == self.offset:  # nothing dropped yet
            return mx.arange(self.offset + T)
        return mx.concatenate(
            [mx.arange(self.keep), mx.arange(self.offset - (S - self.keep), self.offset + T)]
        )

    def make_mask(self, T: int):
        if T == 1:
            return None  # update_and_fetch trims first, so all fetched keys are visible
        qpos = mx.arange(self.offset, self.offset + T)[:, None]
        kpos = self._key_positions(T)[None]
        return (kpos <= qpos) & ((kpos < self.keep) | (kpos > qpos - self.window))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        T = keys.shape[2]
        if T == 1:
            self._trim(self.max_size - 1)
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += T
        k, v = self.keys, self.values
        self._trim(self.max_size)
        return k, v

    def expand(self, n: int) -> None:
        self.keys = mx.repeat(self.keys, n, axis=0)
        self.values = mx.repeat(self.values, n, axis=0)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    capacity_nbytes = nbytes


def make_cache(model, max_kv_size: Optional[int] = None, left_padding=None) -> list:
    """One cache per layer of ``model`` (bounded when ``max_kv_size`` is given)."""
    n = len(model.layers)
    if max_kv_size is not None:
        if left_padding is not None:
            raise ValueError("--max-kv-size cannot be combined with batched prompts yet")
        return [BoundedKVCache(max_kv_size) for _ in range(n)]
    return [KVCache(left_padding) for _ in range(n)]


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)
