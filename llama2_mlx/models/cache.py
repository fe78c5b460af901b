"""Per-layer KV caches, created outside the model and passed to ``Transformer.__call__``.

Every cache is a ``BaseKVCache``: the model and the generation code use that
interface only. Keys and values are stored as (B, n_kv_heads, T, head_dim): with
grouped-query attention the KV heads are never repeated in memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

import mlx.core as mx

from llama2_mlx.errors import Llama2Error


class BaseKVCache(ABC):
    """The interface of a per-layer KV cache.

    Each call of ``attend`` (or ``update_and_fetch``) brings the keys and values
    (B, n_kv_heads, T, head_dim) of T new tokens; ``offset`` is the number of
    tokens seen so far, which is the position of the next one (for RoPE).
    """

    offset: int

    @property
    @abstractmethod
    def state(self) -> list[mx.array]:
        """The arrays the cache holds (what to ``mx.eval`` after a prefill chunk)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the keys and values held for the cached tokens."""

    @abstractmethod
    def make_mask(self, T: int):
        """The mask of the next T queries against the keys ``update_and_fetch`` will
        return for them: None (all visible), "causal", or a boolean array that
        broadcasts to (B, 1, T, keys)."""

    @abstractmethod
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store the new tokens' keys and values; return the keys and values the new
        queries attend to, (B, n_kv_heads, S, head_dim) each."""

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
        """Store the new k, v and return the attention output (B, n_heads, T, head_dim)
        of the queries q (B, n_heads, T, head_dim) over the cache; ``mask`` is
        ``make_mask(T)`` as a rule."""
        k, v = self.update_and_fetch(k, v)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    @abstractmethod
    def trim(self, n: int) -> int:
        """Forget the last n tokens, as if they had never been fed; where only fewer can
        be forgotten exactly, forget those. Return how many were forgotten."""

    @abstractmethod
    def is_trimmable(self) -> bool:
        """Whether ``trim`` can forget a token now."""

    def trimmable_after(self, n: int) -> int:
        """How many of the last tokens ``trim`` could forget exactly once ``n`` more tokens
        are fed in one call (speculative decoding drafts no more than this). By default
        none: a cache that can say more overrides this."""
        return 0

    @abstractmethod
    def expand(self, k: int) -> None:
        """Repeat each sequence (batch row) of the cache k times, in place."""

    def fork(self, k: int) -> BaseKVCache:
        """The cache of this prefilled prompt continued by k sequences per row: by
        default the rows repeated (in place, and returned)."""
        self.expand(k)
        return self


class KVCache(BaseKVCache):
    """A growing cache (in steps of ``step`` tokens).

    ``left_padding`` (one int per sequence) makes it a batched cache for prompts
    of different lengths, left-padded to a common length: padding keys are
    masked out for every query.
    """

    step = 256

    def __init__(self, left_padding: Optional[Sequence[int]] = None):
        self.keys: Optional[mx.array] = None  # (B, n_kv_heads, capacity, head_dim)
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.left_padding = None if left_padding is None else mx.array(list(left_padding))

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

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
                # Slots past offset (trimmed tokens) are dropped, not carried along.
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.keys[..., prev : prev + T, :] = keys
        self.values[..., prev : prev + T, :] = values
        self.offset += T
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, T: int):
        if self.left_padding is None:
            return "causal" if T > 1 else None
        qpos = mx.arange(self.offset, self.offset + T)[:, None]
        kpos = mx.arange(self.offset + T)[None]
        pad = self.left_padding[:, None, None, None]
        # A padding query sees itself, so its softmax row is never empty (no NaN).
        return (kpos <= qpos) & ((kpos >= pad) | (kpos == qpos))  # (B, 1, T, offset+T)

    def trim(self, n: int) -> int:
        n = max(0, min(n, self.offset))
        self.offset -= n  # the next writes overwrite the forgotten slots
        return n

    def is_trimmable(self) -> bool:
        return self.offset > 0

    def trimmable_after(self, n: int) -> int:
        return self.offset + n

    def expand(self, k: int) -> None:
        if self.keys is not None:
            self.keys = mx.repeat(self.keys[..., : self.offset, :], k, axis=0)
            self.values = mx.repeat(self.values[..., : self.offset, :], k, axis=0)
        if self.left_padding is not None:
            self.left_padding = mx.repeat(self.left_padding, k, axis=0)

    def _shareable(self) -> bool:
        # One prefilled, unpadded sequence: what a SharedPrefixKVCache is made from.
        return self.keys is not None and self.keys.shape[0] == 1 and self.left_padding is None

    def fork(self, k: int) -> BaseKVCache:
        """A ``SharedPrefixKVCache`` holding this prompt once for the k sequences when
        the cache is one prefilled, unpadded sequence; else the rows repeated."""
        return SharedPrefixKVCache(self) if self._shareable() else super().fork(k)

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        B, H, _, D = self.keys.shape
        return 2 * B * H * self.offset * D * self.keys.dtype.size

    @property
    def capacity_nbytes(self) -> int:
        """Bytes allocated (the cached tokens rounded up to the growth step)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class BoundedKVCache(BaseKVCache):
    """A cache that never holds more than ``max_size`` tokens.

    It keeps the first ``keep`` tokens (attention sinks) and a sliding window
    of the most recent ``max_size - keep``; each query attends to exactly
    those. Keys are stored already rotated, so kept tokens keep their positions.
    """

    def __init__(self, max_size: int, keep: int = 4):
        if max_size <= keep:
            raise Llama2Error(f"--max-kv-size {max_size} must be larger than keep={keep}")
        self.max_size, self.keep = max_size, keep
        self.window = max_size - keep
        self.keys: Optional[mx.array] = None  # (B, n_kv_heads, size, head_dim), in token order
        self.values: Optional[mx.array] = None
        self.offset = 0  # absolute position of the next token

    @property
    def size(self) -> int:
        """The number of tokens held (at most ``max_size`` between calls)."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    def _keep_recent(self, n: int) -> None:
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
            return None  # update_and_fetch drops the oldest window token first: all visible
        qpos = mx.arange(self.offset, self.offset + T)[:, None]
        kpos = self._key_positions(T)[None]
        return (kpos <= qpos) & ((kpos < self.keep) | (kpos > qpos - self.window))  # (T, size+T)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        T = keys.shape[2]
        if T == 1:
            self._keep_recent(self.max_size - 1)
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += T
        k, v = self.keys, self.values
        self._keep_recent(self.max_size)
        return k, v

    def _exactly_trimmable(self) -> int:
        if self.size == self.offset:  # nothing dropped: the whole history is held
            return self.offset
        # The next query sees the window - 1 tokens before it, and the dropped ones are
        # gone: of the size - keep held after the sinks, all but window - 1 may go.
        return max(0, self.size - self.max_size + 1)

    def trim(self, n: int) -> int:
        """Forget the last n tokens, at most as many as is exact: any number while no
        token has left the window yet; after that only those beyond the window - 1 the
        next query must see (one when the cache is full, none after that)."""
        n = max(0, min(n, self._exactly_trimmable()))
        if n:
            held = self.size - n
            self.keys, self.values = self.keys[..., :held, :], self.values[..., :held, :]
            self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return self._exactly_trimmable() > 0

    def trimmable_after(self, n: int) -> int:
        size = min(self.size + n, self.max_size)
        if self.size == self.offset and self.size + n <= self.max_size:
            return self.offset + n  # still nothing dropped
        return max(0, size - self.max_size + 1)

    def expand(self, k: int) -> None:
        if self.keys is not None:
            self.keys = mx.repeat(self.keys, k, axis=0)
            self.values = mx.repeat(self.values, k, axis=0)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    capacity_nbytes = nbytes


class SharedPrefixKVCache(BaseKVCache):
    """K sequences continuing one prompt, with the prompt's keys and values held once.

    Made from a prefilled batch-1 ``KVCache``; each sequence's own tokens go to a
    (K, ...) ``KVCache``. Attention (``attend``) runs all K sequences' queries
    against the single prompt copy in one product, then against their own keys,
    with one softmax over both: the result equals K repeated copies of the prompt
    cache, which costs K times the prompt's KV memory (and bandwidth) instead.
    """

    def __init__(self, prefix: KVCache):
        if not prefix._shareable():
            raise ValueError("a shared prefix must be a prefilled batch-1 cache without padding")
        n = prefix.offset
        self.prefix_keys = prefix.keys[..., :n, :]  # (1, n_kv_heads, P, head_dim)
        self.prefix_values = prefix.values[..., :n, :]
        self.own = KVCache()  # (K, n_kv_heads, S, head_dim): K set by the first update

    @property
    def offset(self) -> int:
        return self.prefix_keys.shape[2] + self.own.offset

    @property
    def state(self) -> list[mx.array]:
        return [self.prefix_keys, self.prefix_values, *self.own.state]

    def make_mask(self, T: int):
        # The keys of update_and_fetch are the prompt's then the row's own, unpadded:
        # a plain causal mask. ``attend`` applies that causality itself.
        return self.own.make_mask(T)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """The keys and values of the prompt then the row's own, (K, n_kv_heads, P+S, head_dim)
        each. This copies the prompt K times, which ``attend`` (what the model calls)
        avoids; it completes the interface for a caller that runs its own attention."""
        own_k, own_v = self.own.update_and_fetch(keys, values)  # (K, Hkv, S, hd)
        K = own_k.shape[0]

        def rows(prefix: mx.array) -> mx.array:  # (1, Hkv, P, hd) -> (K, Hkv, P, hd)
            return mx.broadcast_to(prefix, (K, *prefix.shape[1:]))

        return (mx.concatenate([rows(self.prefix_keys), own_k], axis=2),
                mx.concatenate([rows(self.prefix_values), own_v], axis=2))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
        """Attention output (K, H, T, hd) of queries q (K, H, T, hd) over the prompt and
        each sequence's cached tokens plus the new k, v (K, n_kv_heads, T, hd)."""
        if mask is not None and not isinstance(mask, str):
            raise ValueError("SharedPrefixKVCache applies its own (causal) mask")
        own_k, own_v = self.own.update_and_fetch(k, v)  # (K, Hkv, S, hd), S = own tokens so far
        K, H, T, D = q.shape
        _, Hkv, P, _ = self.prefix_keys.shape
        S = own_k.shape[2]
        G = H // Hkv  # query heads per KV head
        q = q * scale
        # (K, H, T, hd) -> (1, Hkv, K*G*T, hd): every query of one KV head, all K rows at once.
        qp = q.reshape(K, Hkv, G, T, D).transpose(1, 0, 2, 3, 4).reshape(1, Hkv, K * G * T, D)
        s_prefix = qp @ self.prefix_keys.swapaxes(-1, -2)  # (1, Hkv, K*G*T, P)
        s_prefix = s_prefix.reshape(Hkv, K, G * T, P).transpose(1, 0, 2, 3)  # (K, Hkv, G*T, P)
        # (K, H, T, hd) -> (K, Hkv, G*T, hd): a row's queries grouped by their KV head.
        s_own = q.reshape(K, Hkv, G * T, D) @ own_k.swapaxes(-1, -2)  # (K, Hkv, G*T, S)
        if T > 1:  # new token t (own position S-T+t) sees own keys up to itself
            qpos = mx.arange(S - T, S)
            visible = mx.arange(S)[None] <= qpos[:, None]  # (T, S)
            s_own = mx.where(mx.tile(visible, (G, 1)), s_own, -float("inf"))  # mask (G*T, S)
        probs = mx.softmax(mx.concatenate([s_prefix, s_own], axis=-1), axis=-1, precise=True)
        # (K, Hkv, G*T, P) -> (1, Hkv, K*G*T, P): back to the layout of qp for the prompt's values.
        p_prefix = probs[..., :P].transpose(1, 0, 2, 3).reshape(1, Hkv, K * G * T, P)
        # (1, Hkv, K*G*T, hd) -> (K, H, T, hd), then add the own part (K, Hkv, G*T, hd) alike.
        out = (p_prefix @ self.prefix_values).reshape(Hkv, K, G, T, D).transpose(1, 0, 2, 3, 4)
        out = out.reshape(K, H, T, D) + (probs[..., P:] @ own_v).reshape(K, H, T, D)
        return out

    def trim(self, n: int) -> int:
        """Forget the last of each row's own tokens (never the shared prompt's)."""
        return self.own.trim(n)

    def is_trimmable(self) -> bool:
        return self.own.is_trimmable()

    def trimmable_after(self, n: int) -> int:
        return self.own.trimmable_after(n)

    def expand(self, k: int) -> None:
        """Repeat each row's own tokens k times; all rows still share the one prompt."""
        self.own.expand(k)

    @property
    def nbytes(self) -> int:
        return self.prefix_keys.nbytes + self.prefix_values.nbytes + self.own.nbytes

    @property
    def capacity_nbytes(self) -> int:
        return self.prefix_keys.nbytes + self.prefix_values.nbytes + self.own.capacity_nbytes


def fork(cache: list, k: int) -> list:
    """The caches of a prefilled prompt continued by ``k`` sequences per row (each
    layer's ``fork``: shared where possible, else repeated)."""
    return [c.fork(k) for c in cache]


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``seqs``."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


class PromptCache:
    """A model's KV cache kept from one generation to the next, with the tokens it holds.

    A new prompt that begins with those tokens (the next turn of a chat: the same
    dialog plus a new answer and question) has only its remaining tokens prefilled.
    Reuse is exact: the key and value at position i depend on tokens 0..i only.
    """

    def __init__(self, model, max_kv_size: Optional[int] = None):
        self.model, self.max_kv_size = model, max_kv_size
        self.cache = make_cache(model, max_kv_size)
        self.tokens: list[int] = []

    def reuse(self, ids: Sequence[int]) -> int:
        """Trim the cache to the longest prefix it shares with ``ids`` (at least one token
        of ``ids`` is left to run) and return that prefix's length. Caches that cannot
        be trimmed that far exactly (bounded ones past their window) are replaced by
        fresh ones, and 0 is returned."""
        n = min(common_prefix_length([self.tokens, ids]), len(ids) - 1)
        for c in self.cache:
            c.trim(c.offset - n)
        if any(c.offset != n for c in self.cache):
            self.cache, n = make_cache(self.model, self.max_kv_size), 0
        self.tokens = list(ids[:n])
        return n


def prefill(model, tokens: mx.array, cache: list, step: int) -> mx.array:
    """Run all but the last column of (B, T) ``tokens`` through ``model`` into ``cache``
    in chunks of ``step``; return the rest, (B, 1). Only the caches are evaluated (no
    logits are kept)."""
    while tokens.shape[1] > 1:
        n = min(step, tokens.shape[1] - 1)
        model(tokens[:, :n], cache=cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[:, n:]
        mx.clear_cache()
    return tokens


def make_cache(model, max_kv_size: Optional[int] = None, left_padding=None) -> list:
    """One cache per layer of ``model`` (bounded when ``max_kv_size`` is given)."""
    n = len(model.layers)
    if max_kv_size is not None:
        if left_padding is not None:
            raise Llama2Error("--max-kv-size cannot be combined with batched prompts yet")
        return [BoundedKVCache(max_kv_size) for _ in range(n)]
    return [KVCache(left_padding) for _ in range(n)]


def cache_nbytes(cache: list) -> int:
    """Bytes of the keys and values held by all layers' caches."""
    return sum(c.nbytes for c in cache)
