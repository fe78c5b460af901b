"""The prompt cache across requests: KV caches of earlier contexts, reused by prefix.

A multi-turn chat re-sends its whole history each turn; the context of the last turn
(prompt and answer) is still here, so only the new part is prefilled. Reuse is exact:
the key and value at position i depend on tokens 0..i only. Entries are kept per
model (a base and each adapter have their own), bounded in bytes, least recently
used evicted first. A token trie finds the longest cached prefix in time linear in
the prompt, however many entries there are. Used by the engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from llama2_mlx.serve.batch import KV


@dataclass
class Entry:
    model: str
    tokens: list[int]
    kv: list[KV]  # per layer, (1, n_kv_heads, len(tokens), head_dim)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


@dataclass
class _Node:
    children: dict = field(default_factory=dict)  # token -> _Node
    through: set = field(default_factory=set)  # keys of the entries whose tokens pass here
    ends: set = field(default_factory=set)  # keys of the entries that end here


class LRUPromptCache:
    """Contexts (token ids and their keys and values) of at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[int, Entry]" = OrderedDict()  # least recently used first
        self._roots: dict[str, _Node] = {}  # per model
        self._next = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[Entry]:
        """The entries, least recently used first."""
        return list(self._entries.values())

    def _path(self, model: str, tokens: Sequence[int]) -> list[_Node]:
        """The nodes along ``tokens`` as far as the trie goes (the root first)."""
        node = self._roots.get(model)
        path = [] if node is None else [node]
        for t in tokens:
            node = node.children.get(t) if node is not None else None
            if node is None:
                break
            path.append(node)
        return path

    def lookup(self, model: str, ids: Sequence[int]) -> tuple[int, Optional[list[KV]]]:
        """The longest cached prefix of ``ids`` (leaving at least one token to run) and its
        keys and values per layer (views of an entry: they are never written into)."""
        path = self._path(model, ids[: len(ids) - 1])
        n = len(path) - 1  # tokens matched (the root matches none)
        if n < 1:
            return 0, None
        key = max(path[n].through)  # any entry through it holds the prefix: the newest
        self._entries.move_to_end(key)
        return n, [(k[..., :n, :], v[..., :n, :]) for k, v in self._entries[key].kv]

    def insert(self, model: str, tokens: Sequence[int], kv: list[KV]) -> None:
        """Keep the context ``tokens`` (whose keys and values are ``kv``); an entry it
        extends is dropped, and nothing is added when an entry already extends it."""
        tokens = list(tokens)
        entry = Entry(model, tokens, kv)
        size = entry.nbytes
        if not tokens or size > self.max_bytes:
            return
        path = self._path(model, tokens)
        if len(path) == len(tokens) + 1:  # held already, as (a prefix of) an entry
            self._entries.move_to_end(next(iter(path[-1].through)))
            return
        for key in {key for node in path[1:] for key in node.ends}:
            self._drop(key)  # a prefix of the new one: superseded
        key, self._next = self._next, self._next + 1
        node = self._roots.setdefault(model, _Node())
        node.through.add(key)
        for t in tokens:
            node = node.children.setdefault(t, _Node())
            node.through.add(key)
        node.ends.add(key)
        self._entries[key] = entry
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        node = self._roots[entry.model]
        node.through.discard(key)
        for t in entry.tokens:
            child = node.children[t]
            child.through.discard(key)
            if not child.through:  # nothing else below: cut the branch
                del node.children[t]
                break
            node = child
        else:
            node.ends.discard(key)

    def clear(self) -> None:
        self._entries.clear()
        self._roots.clear()
        self.nbytes = 0
