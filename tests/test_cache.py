"""The KV-cache interface contract (``BaseKVCache``), checked alike for every cache class.

Each case builds one kind of cache for a batch of B rows and knows what the model must
give for tokens fed into it (``reference``) and how many token rows it holds; the same
tests then run over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY, make_model

from llama2_mlx.models.cache import (
    BaseKVCache,
    BoundedKVCache,
    KVCache,
    PromptCache,
    SharedPrefixKVCache,
    cache_nbytes,
    fork,
    make_cache,
)

PROMPT = [7, 11, 13, 17, 19]  # the shared prompt the SharedPrefixKVCache case starts from
MAX, KEEP = 8, 2  # the sliding bounded case: 2 sinks and a window of 6
ATOL = 1e-5


@dataclass
class Case:
    make: Callable  # (model, B) -> one cache per layer, for B rows
    reference: Callable  # (model, tokens (B, T)) -> the logits (B, T, V) the cache must give
    held: Callable  # (tokens fed per row t, B) -> token rows the cache holds


def full(model, tokens):
    return model(tokens)


def windowed(model, tokens):
    """Full forward with an explicit sinks + window mask (what the sliding case computes)."""
    T = tokens.shape[1]
    q, k = mx.arange(T)[:, None], mx.arange(T)[None]
    return model(tokens, mask=(k <= q) & ((k < KEEP) | (k > q - (MAX - KEEP))))


def shared(model, B):
    cache = make_cache(model)
    model(mx.array([PROMPT]), cache=cache)
    return fork(cache, B)


def after_prompt(model, tokens):
    prompt = mx.repeat(mx.array([PROMPT]), tokens.shape[0], axis=0)
    return model(mx.concatenate([prompt, tokens], axis=1))[:, len(PROMPT):]


CASES = {
    "KVCache": Case(lambda m, B: [KVCache() for _ in m.layers], full, lambda t, B: B * t),
    # Zero padding: the batched path with its array masks, which must change nothing.
    "KVCache padded": Case(lambda m, B: [KVCache([0] * B) for _ in m.layers], full,
                           lambda t, B: B * t),
    "BoundedKVCache, within bound": Case(lambda m, B: [BoundedKVCache(64) for _ in m.layers],
                                         full, lambda t, B: B * t),
    "BoundedKVCache, sliding": Case(lambda m, B: [BoundedKVCache(MAX, KEEP) for _ in m.layers],
                                    windowed, lambda t, B: B * min(t, MAX)),
    "SharedPrefixKVCache": Case(shared, after_prompt, lambda t, B: len(PROMPT) + B * t),
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return CASES[request.param]


@pytest.fixture(scope="module")
def model():
    return make_model()


def tokens(B, T, seed=0):
    return mx.array(np.random.RandomState(seed).randint(3, TINY["vocab_size"], (B, T)))


def feed(model, cache, toks, chunks):
    """Run ``toks`` (B, T) through the model in chunks; return the logits (B, T, V)."""
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(toks[:, pos : pos + n], cache=cache))
        pos += n
    assert pos == toks.shape[1]
    return mx.concatenate(outs, axis=1) if outs else None


def close(a, b):
    np.testing.assert_allclose(np.array(a), np.array(b), atol=ATOL)


def test_every_cache_implements_the_interface(model, case):
    assert all(isinstance(c, BaseKVCache) for c in case.make(model, 2))


def test_cached_chunks_equal_the_full_forward(model, case):
    toks = tokens(2, 17)
    cache = case.make(model, 2)
    offset = cache[0].offset
    close(feed(model, cache, toks, [5, 1, 3, 1, 1, 4, 1, 1]), case.reference(model, toks))
    assert all(c.offset == offset + 17 for c in cache)


@pytest.mark.parametrize("n", [3, 100])
def test_trim_then_refeed_equals_never_having_fed(model, case, n):
    toks = tokens(2, 16)
    a = case.make(model, 2)
    feed(model, a, toks[:, :13], [6, 4, 3])  # the last chunk is the one to take back
    assert all(c.is_trimmable() for c in a)
    dropped = {c.trim(n) for c in a}
    assert len(dropped) == 1  # every layer forgets alike
    d = dropped.pop()
    assert 1 <= d <= min(n, 13)
    b = case.make(model, 2)
    kept = 13 - d
    feed(model, b, toks[:, :kept], [c for c in (min(kept, 6), max(kept - 6, 0)) if c])
    assert [c.offset for c in a] == [c.offset for c in b]
    rest = mx.concatenate([toks[:, 13 - d : 13], toks[:, 13:]], axis=1)  # re-fed, then new
    close(feed(model, a, rest, [d, 1, 2]), feed(model, b, rest, [d, 1, 2]))
    # Equal holdings too (right after a trim a sliding cache may hold a token less,
    # one no query can see any more).
    assert cache_nbytes(a) == cache_nbytes(b)


def test_trim_forgets_what_can_be_forgotten_exactly():
    kv = mx.zeros((1, 2, 1, 16))
    c = BoundedKVCache(MAX, KEEP)
    for _ in range(5):
        c.update_and_fetch(kv, kv)
    assert c.trim(3) == 3 and (c.offset, c.size) == (2, 2)  # nothing dropped: any number
    for _ in range(10):
        c.update_and_fetch(kv, kv)
    # Full: the next query needs the window's last MAX - KEEP - 1 tokens, so one may go.
    assert c.is_trimmable() and c.trim(3) == 1 and (c.offset, c.size) == (11, MAX - 1)
    assert not c.is_trimmable() and c.trim(1) == 0
    c.update_and_fetch(kv, kv)
    assert c.trim(1) == 1
    prompt = KVCache()
    prompt.update_and_fetch(mx.zeros((1, 2, 4, 16)), mx.zeros((1, 2, 4, 16)))
    s = SharedPrefixKVCache(prompt)
    s.update_and_fetch(mx.zeros((3, 2, 2, 16)), mx.zeros((3, 2, 2, 16)))
    assert s.trim(5) == 2 and s.offset == 4 and not s.is_trimmable()  # never the prompt


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_nbytes_counts_the_held_keys_and_values(case, dtype):
    model = make_model(dtype=dtype)
    a = model.args
    cache = case.make(model, 3)
    feed(model, cache, tokens(3, 13), [10, 1, 1, 1])
    row = 2 * a.n_kv_heads * a.head_dim * dtype.size  # one token's keys and values, one layer
    assert cache_nbytes(cache) == a.n_layers * row * case.held(13, 3)
    # ``state`` holds at least those (a growing KVCache allocates in steps).
    assert sum(x.nbytes for c in cache for x in c.state) >= cache_nbytes(cache)


@pytest.mark.parametrize("prefix", [0, 6])
def test_fork_rows_equal_independent_runs(model, case, prefix):
    k, toks = 3, tokens(3, prefix + 5, seed=1)
    toks = mx.concatenate([mx.repeat(toks[:1, :prefix], k, axis=0), toks[:, prefix:]], axis=1)
    cache = case.make(model, 1)
    feed(model, cache, toks[:1, :prefix], [prefix] if prefix else [])
    cache = fork(cache, k)
    got = feed(model, cache, toks[:, prefix:], [3, 1, 1])
    for i in range(k):
        alone = case.make(model, 1)
        want = feed(model, alone, toks[i : i + 1], [prefix, 3, 1, 1] if prefix else [3, 1, 1])
        close(got[i], want[0, prefix:])


def test_fork_of_left_padded_prompts_repeats_each_row_with_its_padding(model):
    prompts, k = [tokens(1, 5, seed=4)[0].tolist(), tokens(1, 3, seed=5)[0].tolist()], 2
    cache = make_cache(model, left_padding=[0, 2])
    model(mx.array([prompts[0], [1, 1] + prompts[1]]), cache=cache)
    cache = fork(cache, k)  # rows: prompt 0, prompt 0, prompt 1, prompt 1
    nxt = tokens(2 * k, 3, seed=6)
    got = feed(model, cache, nxt, [2, 1])
    for i in range(2 * k):
        want = model(mx.concatenate([mx.array([prompts[i // k]]), nxt[i : i + 1]], axis=1))
        close(got[i], want[0, -3:])


def test_kvcache_fork_shares_one_prompt_and_bounded_repeats(model):
    cache = make_cache(model)
    model(tokens(1, 4), cache=cache)
    assert all(isinstance(c, SharedPrefixKVCache) for c in fork(cache, 3))
    bounded = make_cache(model, max_kv_size=MAX)
    model(tokens(1, 4), cache=bounded)
    forked = fork(bounded, 3)
    assert all(f is c for f, c in zip(forked, bounded)) and bounded[0].keys.shape[0] == 3


@pytest.mark.parametrize("T", [1, 4])
def test_make_mask_fits_the_fetched_keys_and_attend_is_the_fused_attention(model, case, T):
    a, B = model.args, 2
    one, two = case.make(model, B), case.make(model, B)
    for cache in (one, two):
        feed(model, cache, tokens(B, 9), [6, 3])
    rng = np.random.RandomState(3)
    q, k, v = (mx.array(rng.normal(size=(B, h, T, a.head_dim)).astype(np.float32))
               for h in (a.n_heads, a.n_kv_heads, a.n_kv_heads))
    c = two[0]
    mask = c.make_mask(T)
    keys, values = c.update_and_fetch(k, v)
    S = keys.shape[2]
    assert keys.shape == values.shape == (B, a.n_kv_heads, S, a.head_dim)
    if mask is None:
        assert T == 1
    elif isinstance(mask, str):
        assert mask == "causal" and T > 1
    else:
        assert mx.broadcast_shapes(mask.shape, (B, 1, T, S)) == (B, 1, T, S)
    fused = mx.fast.scaled_dot_product_attention(q, keys, values, scale=a.head_dim**-0.5,
                                                 mask=mask)
    close(one[0].attend(q, k, v, a.head_dim**-0.5, one[0].make_mask(T)), fused)


def test_prompt_cache_takes_a_fresh_cache_where_trim_cannot_be_exact(model):
    pc = PromptCache(model, max_kv_size=MAX)
    ids = tokens(1, 12)[0].tolist()
    model(mx.array([ids]), cache=pc.cache)
    pc.tokens = ids
    assert pc.reuse(ids[:11] + [5, 5]) == 11  # one token to forget: exact
    assert all(c.offset == 11 for c in pc.cache)
    old = pc.cache
    assert pc.reuse(ids[:9] + [5]) == 0  # two more: not exact past the window, start afresh
    assert pc.cache is not old and all(c.offset == 0 and c.max_size == MAX for c in pc.cache)
