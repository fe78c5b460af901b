"""The KV caches of the serving engine.

``SeqCache`` holds one sequence's keys and values while a long prompt is prefilled in
chunks (batch 1, exactly the computation of ``generate``); ``prefill_rows`` runs several
prompts at once as one left-padded batch, each after its own cached prefix (masked so
that every row computes what it would alone). ``DecodeBatch`` holds every sequence that
is decoding, so that one model call per step serves them all:

* **plain rows** (a request with n = 1) keep their whole context in one
  (B, n_kv_heads, S, head_dim) array, left-padded to the longest row; padding keys
  are masked out and each row's RoPE position is its own, so a row's attention is
  the very computation it would get alone.
* **pooled rows** (the n samples of one request) share their prompt's keys and
  values, held once in a pool (the idea of ``models.cache.fork``); each row keeps only
  its own tokens, and attends to its group's part of the pool and its own keys with
  one softmax over both.

Sequences join (``add_plain`` / ``add_group``) and leave (``keep``) between steps;
both re-lay the arrays out (never while a step is being built). Each layer gets a view
(``layers``) that the model's attention calls through ``attend``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

KV = tuple[mx.array, mx.array]  # (1, n_kv_heads, T, head_dim) keys and values of one layer


def _zeros_like_rows(a: mx.array, rows: int, cols: int) -> mx.array:
    return mx.zeros((rows, a.shape[1], cols, a.shape[3]), a.dtype)


class SeqCache:
    """One layer's cache of one sequence (batch 1), growing in steps of ``step`` tokens;
    optionally started from ``kv`` (a prefix taken from the prompt cache)."""

    step = 256

    def __init__(self, kv: Optional[KV] = None):
        self.keys, self.values = kv if kv is not None else (None, None)
        self.offset = 0 if kv is None else kv[0].shape[2]

    def make_mask(self, T: int):
        return None  # ``attend`` applies the causal mask itself

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
        T, prev = k.shape[2], self.offset
        if self.keys is None or prev + T > self.keys.shape[2]:
            grow = ((T + self.step - 1) // self.step) * self.step
            new_k, new_v = _zeros_like_rows(k, 1, grow), _zeros_like_rows(v, 1, grow)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.keys[..., prev : prev + T, :] = k
        self.values[..., prev : prev + T, :] = v
        self.offset += T
        keys, values = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        return mx.fast.scaled_dot_product_attention(
            q, keys, values, scale=scale, mask="causal" if T > 1 else None)

    def state(self) -> Optional[KV]:
        """The cached keys and values as arrays of their own (None when empty)."""
        if not self.offset:
            return None
        return (mx.contiguous(self.keys[..., : self.offset, :]),
                mx.contiguous(self.values[..., : self.offset, :]))


class _PrefillLayer:
    """One layer of ``prefill_rows``: the cached contexts (right-aligned at N) and then
    this call's tokens (right-aligned at N+M); masked so that each row sees exactly its
    own context and its new tokens causally."""

    def __init__(self, batch: "_PrefillBatch", i: int):
        self.batch, self.i = batch, i
        self.new: Optional[KV] = None

    @property
    def offset(self) -> mx.array:
        return self.batch.positions

    def make_mask(self, T: int):
        return None

    def attend(self, q, k, v, scale, mask=None):
        self.new = (k, v)
        cached = self.batch.cached[self.i]
        if cached is not None:
            k = mx.concatenate([cached[0], k], axis=2)
            v = mx.concatenate([cached[1], v], axis=2)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=self.batch.mask)


class _PrefillBatch:
    def __init__(self, contexts: Sequence[Optional[Sequence[KV]]], lengths: Sequence[int],
                 n_layers: int):
        self.n = [0 if c is None else c[0][0].shape[2] for c in contexts]
        self.m = list(lengths)
        N, M, B = max(self.n), max(self.m), len(self.m)
        self.cached: list[Optional[KV]] = [None] * n_layers
        if N:
            ref = next(c for c in contexts if c is not None)
            for i in range(n_layers):
                parts = []
                for j in range(2):  # keys, values
                    rows = []
                    for c, n in zip(contexts, self.n):
                        a = _zeros_like_rows(ref[i][j], 1, N - n)
                        rows.append(a if c is None else mx.concatenate([a, c[i][j]], axis=2))
                    parts.append(mx.concatenate(rows, axis=0))
                self.cached[i] = (parts[0], parts[1])
        # Row b's new token t (of T = M columns) is at position n_b + t - (M - m_b).
        self.positions = mx.array([n - (M - m) for n, m in zip(self.n, self.m)])
        q = mx.arange(M)[:, None]
        keys = mx.arange(N + M)[None]
        n, pad = mx.array(self.n)[:, None, None], mx.array([M - m for m in self.m])[:, None, None]
        in_context = (keys >= N - n) & (keys < N)
        in_new = (keys >= N + pad) & (keys - N <= q)
        self.mask = (in_context | in_new | (keys - N == q))[:, None]  # (B, 1, M, N+M)
        self.layers = [_PrefillLayer(self, i) for i in range(n_layers)]
        self.B = B

    def context(self, b: int) -> list[KV]:
        """Row b's whole context (cached and new) per layer, as arrays of its own."""
        N, M = max(self.n), max(self.m)
        out = []
        for i, layer in enumerate(self.layers):
            kv = []
            for j in range(2):
                new = layer.new[j][b : b + 1, :, M - self.m[b] :, :]
                if self.n[b]:
                    new = mx.concatenate([self.cached[i][j][b : b + 1, :, N - self.n[b] :, :], new],
                                         axis=2)
                kv.append(mx.contiguous(new))
            out.append((kv[0], kv[1]))
        return out


def prefill_rows(model, contexts: Sequence[Optional[Sequence[KV]]],
                 tokens: Sequence[Sequence[int]]) -> list[list[KV]]:
    """Run several sequences' next tokens (each after its cached context, None: none) as
    one left-padded batch; return each one's context per layer. A row's keys and values
    are those of running it alone (its padding is masked out, its positions are its own)."""
    M = max(len(t) for t in tokens)
    batch = _PrefillBatch(contexts, [len(t) for t in tokens], len(model.layers))
    ids = mx.array([[t[0]] * (M - len(t)) + list(t) for t in tokens])
    model(ids, cache=batch.layers)  # lazily: only what the caches need is computed
    out = [batch.context(b) for b in range(batch.B)]
    mx.eval(out)
    return out


class _Rows:
    """Rows whose own keys are right-aligned in one array per layer: row b holds its
    tokens in columns ``pad[b]:S``."""

    step = 256

    def __init__(self, n_layers: int):
        self.keys: list[Optional[mx.array]] = [None] * n_layers
        self.values: list[Optional[mx.array]] = [None] * n_layers
        self.pad: list[int] = []
        self.S = 0
        self.mask = None  # this step's (B, 1, 1, S+1) visibility, None: nothing padded

    def __len__(self) -> int:
        return len(self.pad)

    def add(self, own: Optional[Sequence[KV]], count: int) -> None:
        """Append ``count`` rows holding ``own`` (per layer; None: no tokens yet)."""
        L = 0 if own is None else own[0][0].shape[2]
        S, B = max(self.S, L), len(self.pad)
        for i in range(len(self.keys)):
            old = (self.keys[i], self.values[i])
            if old[0] is None and own is None:
                continue  # no tokens anywhere yet: ``write`` makes the arrays
            ref = old if old[0] is not None else own[i]
            new = []
            for j in range(2):  # keys, then values
                parts = []
                if B:  # the rows so far, left-extended to S columns
                    a = _zeros_like_rows(ref[j], B, S) if old[j] is None else old[j][..., : self.S, :]
                    if old[j] is not None and S > self.S:
                        a = mx.concatenate([_zeros_like_rows(a, B, S - self.S), a], axis=2)
                    parts.append(a)
                if own is None:
                    parts.append(_zeros_like_rows(ref[j], count, S))
                else:
                    a = own[i][j]
                    if S > L:
                        a = mx.concatenate([_zeros_like_rows(a, 1, S - L), a], axis=2)
                    parts.append(mx.repeat(a, count, axis=0) if count > 1 else a)
                new.append(mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0])
            self.keys[i], self.values[i] = new
        self.pad = [p + S - self.S for p in self.pad] + [S - L] * count
        self.S = S

    def keep(self, idx: Sequence[int]) -> None:
        """Keep only rows ``idx`` (in that order); drop the columns no row uses any more."""
        self.pad = [self.pad[i] for i in idx]
        if not self.pad:
            self.keys = [None] * len(self.keys)
            self.values = [None] * len(self.values)
            self.S = 0
            return
        drop = min(self.pad)
        sel = mx.array(list(idx))
        for i in range(len(self.keys)):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][sel][..., drop : self.S, :]
                self.values[i] = self.values[i][sel][..., drop : self.S, :]
        self.pad = [p - drop for p in self.pad]
        self.S -= drop

    def begin_step(self) -> None:
        if any(self.pad):
            cols = mx.arange(self.S + 1)[None]
            self.mask = (cols >= mx.array(self.pad)[:, None])[:, None, None, :]
        else:
            self.mask = None

    def write(self, i: int, k: mx.array, v: mx.array) -> KV:
        """Store this step's key and value (B, n_kv_heads, 1, head_dim) of layer ``i`` at
        column S; return the keys and values of columns 0..S."""
        S = self.S
        if self.keys[i] is None:
            self.keys[i] = _zeros_like_rows(k, len(self.pad), self.step)
            self.values[i] = _zeros_like_rows(v, len(self.pad), self.step)
        elif S + 1 > self.keys[i].shape[2]:
            self.keys[i] = mx.concatenate(
                [self.keys[i][..., :S, :], _zeros_like_rows(k, len(self.pad), self.step)], axis=2)
            self.values[i] = mx.concatenate(
                [self.values[i][..., :S, :], _zeros_like_rows(v, len(self.pad), self.step)], axis=2)
        self.keys[i][..., S : S + 1, :] = k
        self.values[i][..., S : S + 1, :] = v
        return self.keys[i][..., : S + 1, :], self.values[i][..., : S + 1, :]

    def row(self, i: int, b: int) -> KV:
        """Row b's own keys and values of layer i, as arrays of their own."""
        p = self.pad[b]
        return (mx.contiguous(self.keys[i][b : b + 1, :, p : self.S, :]),
                mx.contiguous(self.values[i][b : b + 1, :, p : self.S, :]))

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values) if k is not None)


class _LayerView:
    """What one layer's attention sees of the batch (the model's cache protocol)."""

    def __init__(self, batch: "DecodeBatch", i: int):
        self.batch, self.i = batch, i

    @property
    def offset(self) -> mx.array:
        return self.batch.positions  # (B,) RoPE position of each row's new token

    def make_mask(self, T: int):
        return None

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
        return self.batch.attend(self.i, q, k, v, scale)


class DecodeBatch:
    """Every decoding sequence of one model as one batch: plain rows first, then the
    pooled rows of the groups (in the order they were added)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.plain = _Rows(n_layers)
        self.pooled = _Rows(n_layers)
        self.groups: list[list] = []  # [prefix per layer, rows] for each group, in row order
        self.pool: Optional[list[KV]] = None  # the groups' prefixes side by side, per layer
        self.pool_mask = None
        self.positions: Optional[mx.array] = None
        self.layers = [_LayerView(self, i) for i in range(n_layers)]

    def __len__(self) -> int:
        return len(self.plain) + len(self.pooled)

    @property
    def n_plain(self) -> int:
        return len(self.plain)

    def add_plain(self, kv: Optional[Sequence[KV]]) -> None:
        """A row continuing the context ``kv`` (per layer; None: empty), after the plain rows."""
        self.plain.add(kv, 1)

    def add_group(self, prefix: Sequence[KV], k: int) -> None:
        """``k`` rows continuing one shared, non-empty context ``prefix``, held once."""
        self.pooled.add(None, k)
        self.groups.append([list(prefix), k])
        self.pool = None

    def keep(self, idx: Sequence[int]) -> None:
        """Keep rows ``idx`` (ascending indices of the current order)."""
        P = len(self.plain)
        self.plain.keep([i for i in idx if i < P])
        pooled = [i - P for i in idx if i >= P]
        counts, start = [], 0
        for g in self.groups:  # rows left per group
            counts.append(sum(start <= i < start + g[1] for i in pooled))
            start += g[1]
        if counts != [g[1] for g in self.groups]:
            self.groups = [[g[0], c] for g, c in zip(self.groups, counts) if c]
            self.pool = None
        self.pooled.keep(pooled)

    def _build_pool(self) -> None:
        self.pool = [
            (mx.concatenate([g[0][i][0] for g in self.groups], axis=2),
             mx.concatenate([g[0][i][1] for g in self.groups], axis=2))
            for i in range(self.n_layers)
        ]
        if len(self.groups) == 1:
            self.pool_mask = None  # every pooled row sees the whole pool
        else:
            lengths = [g[0][0][0].shape[2] for g in self.groups]
            cols = mx.arange(sum(lengths))[None]
            starts, ends, s = [], [], 0
            for n, (_, rows) in zip(lengths, self.groups):
                starts += [s] * rows
                ends += [s + n] * rows
                s += n
            lo, hi = mx.array(starts)[:, None], mx.array(ends)[:, None]
            self.pool_mask = ((cols >= lo) & (cols < hi))[:, None, None, :]

    def begin_step(self) -> None:
        """Prepare the masks and positions of the next decode step."""
        self.plain.begin_step()
        self.pooled.begin_step()
        if self.groups and self.pool is None:
            self._build_pool()
        pos = [self.plain.S - p for p in self.plain.pad]
        p = 0
        for prefix, rows in self.groups:
            n = prefix[0][0].shape[2]
            pos += [n + self.pooled.S - pad for pad in self.pooled.pad[p : p + rows]]
            p += rows
        self.positions = mx.array(pos)

    def end_step(self) -> None:
        self.plain.S += 1
        self.pooled.S += 1

    def attend(self, i: int, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        if q.shape[2] != 1:
            raise ValueError("a DecodeBatch runs one token per row and step")
        P, Q = len(self.plain), len(self.pooled)
        outs = []
        if P:
            qp, kp, vp = (q, k, v) if not Q else (q[:P], k[:P], v[:P])
            keys, values = self.plain.write(i, kp, vp)
            outs.append(mx.fast.scaled_dot_product_attention(
                qp, keys, values, scale=scale, mask=self.plain.mask))
        if Q:
            qq, kq, vq = (q, k, v) if not P else (q[P:], k[P:], v[P:])
            keys, values = self.pooled.write(i, kq, vq)
            outs.append(self._pooled_attention(i, qq, keys, values, scale))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)

    def _pooled_attention(self, i, q, own_k, own_v, scale) -> mx.array:
        """As ``SharedPrefixKVCache.attend`` (one query per row), with masks: a row sees
        its group's part of the pool and its own (left-padded) keys."""
        pool_k, pool_v = self.pool[i]
        B, H, _, D = q.shape
        Hkv, Ptot = pool_k.shape[1], pool_k.shape[2]
        G = H // Hkv
        q = q * scale
        qp = q.reshape(B, Hkv, G, D).transpose(1, 0, 2, 3).reshape(1, Hkv, B * G, D)
        s_pool = (qp @ pool_k.swapaxes(-1, -2)).reshape(Hkv, B, G, Ptot).transpose(1, 0, 2, 3)
        if self.pool_mask is not None:
            s_pool = mx.where(self.pool_mask, s_pool, -float("inf"))
        s_own = q.reshape(B, Hkv, G, D) @ own_k.swapaxes(-1, -2)  # (B, Hkv, G, S+1)
        if self.pooled.mask is not None:
            s_own = mx.where(self.pooled.mask, s_own, -float("inf"))
        probs = mx.softmax(mx.concatenate([s_pool, s_own], axis=-1), axis=-1, precise=True)
        p_pool = probs[..., :Ptot].transpose(1, 0, 2, 3).reshape(1, Hkv, B * G, Ptot)
        out = (p_pool @ pool_v).reshape(Hkv, B, G, D).transpose(1, 0, 2, 3)
        return (out + probs[..., Ptot:] @ own_v).reshape(B, H, 1, D)

    def row_length(self, b: int) -> int:
        """Tokens in the context of plain row ``b``."""
        return self.plain.S - self.plain.pad[b]

    def plain_row(self, b: int) -> list[KV]:
        """Plain row b's context, per layer, as arrays of its own (for the prompt cache)."""
        return [self.plain.row(i, b) for i in range(self.n_layers)]

    @property
    def nbytes(self) -> int:
        """Bytes held for the batch's keys and values (the pooled prefixes included)."""
        pool = sum(k.nbytes + v.nbytes for g in self.groups for k, v in g[0])
        return self.plain.nbytes + self.pooled.nbytes + pool
