"""The prompt cache across requests: KV caches of earlier contexts, reused by prefix.

A multi-turn chat re-sends its whole history each turn; the context of the last turn
(prompt and answer) is still here, so only the new part is prefilled. Reuse is exact:
the key and value at position i depend on tokens 0..i only. Entries are kept per
model (a base and each adapter have their own), bounded in bytes, least recently
used evicted first. Used by the engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

from llama2_mlx.models.cache import common_prefix_length
from llama2_mlx.serve.batch import KV


@dataclass
class Entry:
    model: str
    tokens: list[int]
    kv: list[KV]  # per layer, (1, n_kv_heads, len(tokens), head_dim)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


class LRUPromptCache:
    """Contexts (token ids and their keys and values) of at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[int, Entry]" = OrderedDict()  # least recently used first
        self._next = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, model: str, ids: Sequence[int]) -> tuple[int, Optional[list[KV]]]:
        """The longest cached prefix of ``ids`` (leaving at least one token to run) and its
        keys and values per layer (views of the entry: they are never written into)."""
        best, best_n = None, 0
        for key, e in self._entries.items():
            if e.model == model:
                n = common_prefix_length([e.tokens, ids])
                if n > best_n:
                    best, best_n = key, n
        n = min(best_n, len(ids) - 1)
        if best is None or n < 1:
            return 0, None
        self._entries.move_to_end(best)
        return n, [(k[..., :n, :], v[..., :n, :]) for k, v in self._entries[best].kv]

    def insert(self, model: str, tokens: Sequence[int], kv: list[KV]) -> None:
        """Keep the context ``tokens`` (whose keys and values are ``kv``); an entry it
        extends is dropped, and nothing is added when an entry already extends it."""
        tokens = list(tokens)
        entry = Entry(model, tokens, kv)
        size = entry.nbytes
        if not tokens or size > self.max_bytes:
            return
        for key, e in list(self._entries.items()):
            if e.model != model:
                continue
            n = common_prefix_length([e.tokens, tokens])
            if n == len(tokens):  # already held (as a prefix of e)
                self._entries.move_to_end(key)
                return
            if n == len(e.tokens):  # e is a prefix of the new one: superseded
                self._drop(key)
        self._entries[self._next] = entry
        self._next += 1
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
