"""The serving engine without HTTP: the decode batch's caches, the prompt cache, and the
engine thread (continuous batching, n samples over one prefill, seeds, cancellation,
failures), on tiny random models and the test tokenizer."""

from __future__ import annotations

import random
import threading
import time

import mlx.core as mx
import pytest
from conftest import make_model

from llama2_mlx import blas
from llama2_mlx.generation.generate import GenerationConfig, generate_step, sample_k
from llama2_mlx.serve.batch import DecodeBatch, SeqCache, prefill_rows
from llama2_mlx.serve.engine import Engine
from llama2_mlx.serve.jobs import Delta, Done, Failed, Finish, Job
from llama2_mlx.serve.prompt_cache import LRUPromptCache


REFERENCE_BLAS = blas.describe().name == blas.REFERENCE

def prompts(n, seed=0, lengths=(3, 11, 1, 24, 7, 16)):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(lengths[i % len(lengths)] - 1)]
            for i in range(n)]


def greedy(model, ids, n):
    return [t.item() for t, _ in generate_step(model, mx.array(ids), max_tokens=n)]


@pytest.fixture(scope="module")
def model():
    return make_model()


# ----------------------------------------------------------------------------- the batch


def _run(model, ids):
    """Per-layer caches after running ``ids``, alone."""
    caches = [SeqCache() for _ in model.layers]
    if ids:
        model(mx.array(ids)[None], cache=caches)
    return caches


def _prefill(model, ids):
    """The context of all but the last prompt token (the first decode step's input)."""
    return [c.state() for c in _run(model, ids[:-1])] if len(ids) > 1 else None


def test_decode_batch_rows_joining_and_leaving_decode_exactly_as_alone(model):
    """Rows of different lengths join at different steps (plain rows and a pooled group
    of 3 over one prompt copy) and leave when done; every row's tokens and logprobs
    are those of the sequence decoded alone."""
    ps = prompts(5, seed=3)
    n = 9
    want = {i: greedy(model, p, n) for i, p in enumerate(ps)}
    joins = {0: 0, 1: 0, 2: 2, 3: 3, 4: 5}  # prompt -> step it joins at
    group = 3  # prompt 3 joins as a group of 3 samples
    length = {0: 9, 1: 4, 2: 9, 3: 6, 4: 9}
    batch, rows, nxt, got = DecodeBatch(len(model.layers)), [], [], {}
    for step in range(40):
        for i in [i for i, s in joins.items() if s == step]:
            kv = _prefill(model, ps[i])
            if i == group:
                before = batch.nbytes
                batch.add_group(kv, 3)
                # The 3 samples share one copy of the prompt's keys and values.
                assert batch.nbytes - before == sum(k.nbytes + v.nbytes for k, v in kv)
                new = [(i, j) for j in range(3)]
                at = len(rows)
            else:
                batch.add_plain(kv)
                new, at = [(i, 0)], batch.n_plain - 1
            rows[at:at] = new
            nxt[at:at] = [ps[i][-1]] * len(new)
            got.update({r: [] for r in new})
        if not rows:
            break
        batch.begin_step()
        logits = model(mx.array(nxt)[:, None], cache=batch.layers)[:, -1, :]
        batch.end_step()
        y = mx.argmax(logits, axis=-1).tolist()
        keep = []
        for b, (r, t) in enumerate(zip(rows, y)):
            got[r].append(t)
            if len(got[r]) < length[r[0]]:
                keep.append(b)
        before = batch.nbytes
        batch.keep(keep)
        assert batch.nbytes <= before
        rows, nxt = [rows[b] for b in keep], [y[b] for b in keep]
    assert not rows and len(got) == 7
    for (i, _), toks in got.items():
        assert toks == want[i][: length[i]], (i, toks)


def test_seq_cache_prefill_equals_generate_steps(model):
    ids = prompts(1, seed=5, lengths=(30,))[0]
    caches = [SeqCache() for _ in model.layers]
    for chunk in (ids[:10], ids[10:-1]):  # prefilled in two chunks
        model(mx.array(chunk)[None], cache=caches)
    logits = model(mx.array(ids[-1:])[None], cache=caches)[0, -1]
    assert mx.argmax(logits).item() == greedy(model, ids, 1)[0]
    assert caches[0].offset == len(ids) and caches[0].state()[0].shape[2] == len(ids)


def test_prefill_rows_of_different_contexts_equal_each_prefilled_alone(model):
    """Several prompts' next tokens, each after a cached context of its own length (or
    none), run as one left-padded batch: every row's keys and values are bit-identical
    to running it alone with MLX's reference BLAS. An optimized BLAS (OpenBLAS) picks its
    kernels by the number of rows, so a batch of rows and one row round differently
    there: float tolerance (the tokens are compared exactly by the live-server tests)."""
    rng = random.Random(4)
    for rows in ([(6, 7), (0, 5), (8, 1), (3, 12)], [(0, 4), (0, 9)]):  # (cached, new) tokens
        _check_prefill_rows(model, rows, rng)


def _check_prefill_rows(model, rows, rng):
    seqs = [[rng.randrange(3, 512) for _ in range(a + b)] for a, b in rows]
    contexts = [[c.state() for c in _run(model, s[:a])] if a else None
                for (a, _), s in zip(rows, seqs)]
    got = prefill_rows(model, contexts, [s[a:] for (a, _), s in zip(rows, seqs)])
    for (a, _), s, ctx in zip(rows, seqs, got):
        alone = _run(model, s[:a])
        model(mx.array(s[a:])[None], cache=alone)
        for (k, v), c in zip(ctx, alone):
            ref_k, ref_v = c.state()
            assert k.shape == ref_k.shape
            if REFERENCE_BLAS:
                assert mx.array_equal(k, ref_k) and mx.array_equal(v, ref_v)
            else:
                assert mx.allclose(k, ref_k, atol=1e-5) and mx.allclose(v, ref_v, atol=1e-5)


# ----------------------------------------------------------------------------- prompt cache


def _kv(n, layers=2):
    return [(mx.zeros((1, 2, n, 4)), mx.zeros((1, 2, n, 4))) for _ in range(layers)]


def test_prompt_cache_longest_prefix_supersedes_and_evicts_by_bytes():
    per_token = 2 * 2 * (2 * 4 * 4)  # layers * (k, v) * heads * head_dim * float32
    cache = LRUPromptCache(max_bytes=20 * per_token)
    cache.insert("m", [1, 2, 3], _kv(3))
    assert cache.lookup("m", [1, 2, 3, 4])[0] == 3
    assert cache.lookup("m", [1, 2, 3])[0] == 2  # one token is always left to run
    assert cache.lookup("other", [1, 2, 3, 4]) == (0, None)  # per model
    cache.insert("m", [1, 2, 3, 4, 5], _kv(5))  # extends [1, 2, 3]: replaces it
    assert len(cache) == 1 and cache.nbytes == 5 * per_token
    cache.insert("m", [1, 2], _kv(2))  # already held as a prefix: nothing added
    assert len(cache) == 1
    n, kv = cache.lookup("m", [1, 2, 3, 9])
    assert n == 3 and kv[0][0].shape == (1, 2, 3, 4)
    cache.insert("m", [7] * 10, _kv(10))
    cache.lookup("m", [1, 2, 3, 4, 5, 6])  # [1..5] is now the most recently used
    cache.insert("m", [8] * 8, _kv(8))  # 5 + 10 + 8 > 20: the least recently used goes
    assert cache.lookup("m", [7] * 11) == (0, None)
    assert cache.lookup("m", [1, 2, 3, 4, 5, 6])[0] == 5 and cache.nbytes == 13 * per_token
    cache.insert("m", [9] * 30, _kv(30))  # larger than the whole budget: not kept
    assert cache.lookup("m", [9] * 31) == (0, None)


def test_prompt_cache_trie_agrees_with_a_brute_force_search():
    from llama2_mlx.models.cache import common_prefix_length

    rng = random.Random(0)
    per_token = 2 * 2 * (2 * 4 * 4)
    for max_tokens in (10_000, 40):  # without eviction, then with
        cache, live = LRUPromptCache(max_bytes=max_tokens * per_token), []
        for _ in range(400):
            seq = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
            if rng.random() < 0.5:
                cache.insert("m", seq, _kv(len(seq)))
                live = [t for t in live if common_prefix_length([t, seq]) < len(t)]
                if not any(common_prefix_length([t, seq]) == len(seq) for t in live):
                    live.append(seq)
            else:
                n, kv = cache.lookup("m", seq)
                held = [e.tokens for e in cache.entries]
                want = max([common_prefix_length([t, seq]) for t in held] + [0])
                assert n == min(want, len(seq) - 1) and (kv is None) == (n == 0)
                assert kv is None or kv[0][0].shape[2] == n
            held = [e.tokens for e in cache.entries]
            assert cache.nbytes == sum(len(t) for t in held) * per_token <= max_tokens * per_token
            if max_tokens == 10_000:
                assert sorted(held) == sorted(live)  # no prefix of another is kept


# ----------------------------------------------------------------------------- the engine


class Collect:
    """The events of one job."""

    def __init__(self):
        self.events, self.finished = [], threading.Event()

    def __call__(self, events):
        self.events += events
        if isinstance(events[-1], (Done, Failed)):
            self.finished.set()

    def wait(self, timeout=60):
        assert self.finished.wait(timeout), "the job did not finish"
        return self

    @property
    def end(self):
        return self.events[-1]

    def tokens(self, index=0):
        return [t.id for e in self.events if isinstance(e, Delta) and e.index == index
                for t in e.tokens]

    def text(self, index=0):
        return "".join(e.text for e in self.events if isinstance(e, Delta) and e.index == index)

    def reasons(self):
        return {e.index: e.reason for e in self.events if isinstance(e, Finish)}


def job(ids, max_tokens=8, model="m", **kw):
    opts = {k: kw.pop(k) for k in list(kw) if k in ("n", "best_of", "logprobs", "top_logprobs")}
    c = Collect()
    return Job(model, list(ids), GenerationConfig(max_tokens=max_tokens, **kw), c,
               logprobs=opts.pop("logprobs", True), **opts), c


@pytest.fixture
def engine(model, tok):
    eng = Engine({"m": (model, tok)}, max_concurrency=8)
    eng.start()
    yield eng
    eng.stop()
    assert not eng.alive


def test_concurrent_greedy_requests_equal_each_served_alone(engine, model):
    """Requests of different prompt lengths arrive while others decode; each one's greedy
    tokens equal ``generate_step`` alone (continuous batching is exact)."""
    ps = prompts(6, seed=1)
    want = [greedy(model, p, 12) for p in ps]
    jobs = [job(p, 12, temp=0.0) for p in ps]
    for j, _ in jobs[:3]:
        engine.submit(j)
    time.sleep(0.05)  # the first ones are decoding when the rest arrive
    for j, _ in jobs[3:]:
        engine.submit(j)
    got = [c.wait().tokens() for _, c in jobs]
    assert got == want
    assert all(isinstance(c.end, Done) and c.reasons() == {0: "length"} for _, c in jobs)
    assert engine.stats["max_batch"] > 1  # they did share decode steps
    assert engine.stats["prefill_calls"] < 6  # and some were prefilled together


def test_n_samples_prefill_the_prompt_once(engine, model, tok):
    ids = prompts(1, seed=2, lengths=(20,))[0]
    before = engine.stats["prefilled_tokens"]
    j, c = job(ids, 6, temp=0.0, n=3)
    engine.submit(j)
    c.wait()
    assert engine.stats["prefilled_tokens"] - before == len(ids) - 1  # once, not 3 times
    ref = greedy(model, ids, 6)
    assert [c.tokens(i) for i in range(3)] == [ref] * 3
    assert c.end.completion_tokens == 18 and c.end.prompt_tokens == len(ids)
    # Sampled: equal to sample_k's distribution is not checkable, reproducibility is.
    runs = []
    for _ in range(2):
        j, c = job(ids, 6, temp=1.0, seed=4, n=4)
        engine.submit(j)
        runs.append([c.wait().tokens(i) for i in range(4)])
    assert runs[0] == runs[1] and len({tuple(s) for s in runs[0]}) > 1
    assert sample_k(model, ids, 2, GenerationConfig(max_tokens=6), tok.eos_id).tokens == [ref] * 2


def test_the_samples_of_one_request_join_the_batch_over_one_prompt_copy(model, tok):
    from llama2_mlx.serve.runs import Lane, Run

    lane = Lane("m", model, tok)
    ids = prompts(1, seed=2, lengths=(20,))[0]
    kv = _prefill(model, ids)
    lane.add(Run(job(ids, 4, n=3)[0], lane), kv)
    lane.add(Run(job(ids, 4)[0], lane), kv)
    prompt_bytes = sum(k.nbytes + v.nbytes for k, v in kv)
    assert len(lane.rows) == 4 and lane.batch.n_plain == 1
    assert lane.batch.nbytes == 2 * prompt_bytes  # once for the 3 samples, once for the other
    assert lane.next.tolist() == [ids[-1]] * 4


def test_seeded_sampling_does_not_depend_on_other_traffic(engine):
    ids = prompts(1, seed=6)[0]
    opts = dict(temp=1.0, top_p=0.9, top_k=50, repetition_penalty=1.3, seed=11)
    j, alone = job(ids, 10, **opts)
    engine.submit(j)
    alone.wait()
    others = [job(p, 10, temp=1.0) for p in prompts(4, seed=7)]
    j, busy = job(ids, 10, **opts)
    for o, _ in others[:2]:
        engine.submit(o)
    engine.submit(j)
    for o, _ in others[2:]:
        engine.submit(o)
    assert busy.wait().tokens() == alone.tokens()
    j, other_seed = job(ids, 10, **{**opts, "seed": 12})
    engine.submit(j)
    assert other_seed.wait().tokens() != alone.tokens()


def test_multi_turn_reuses_the_cached_context_with_the_same_answer(model, tok):
    turn1 = prompts(1, seed=8, lengths=(15,))[0]
    answers = {}
    for cache_bytes in (1 << 26, 0):
        eng = Engine({"m": (model, tok)}, prompt_cache_bytes=cache_bytes)
        eng.start()
        try:
            j, c1 = job(turn1, 6, temp=0.0)
            eng.submit(j)
            turn2 = turn1 + c1.wait().tokens() + [2, 1, 40, 41, 42]  # answer, EOS, next turn
            j, c2 = job(turn2, 6, temp=0.0)
            eng.submit(j)
            answers[cache_bytes] = (c2.wait().tokens(), c2.end.cached_tokens)
        finally:
            eng.stop()
    (with_cache, cached), (without, none) = answers[1 << 26], answers[0]
    assert with_cache == without and none == 0
    # The prompt and all 6 answer tokens: the pipelined step fed the last one back too.
    assert cached == len(turn1) + 6


def test_cancel_stops_a_sequence_and_frees_its_rows(engine):
    j, c = job(prompts(1)[0], 200, temp=0.0)
    engine.submit(j)
    for _ in range(500):
        if c.tokens():
            break
        time.sleep(0.01)
    engine.cancel(j)
    for _ in range(500):
        status = engine.status()
        if status["decoding_sequences"] == 0 and status["cancelled"] == 1:
            break
        time.sleep(0.01)
    assert status["decoding_sequences"] == 0 and status["active_requests"] == 0
    assert status["cancelled"] == 1 and len(c.tokens()) < 200
    j, c = job(prompts(1)[0], 3, temp=0.0)  # still serving
    engine.submit(j)
    assert isinstance(c.wait().end, Done)


class Poisoned:
    """A model that fails whenever token ``bad`` is among its inputs."""

    def __init__(self, model, bad):
        self.model, self.bad, self.layers = model, bad, model.layers

    def __call__(self, tokens, cache=None):
        if (tokens == self.bad).any().item():
            raise RuntimeError("poisoned input")
        return self.model(tokens, cache=cache)


def test_a_request_the_engine_fails_on_gets_500_and_the_engine_lives_on(model, tok):
    eng = Engine({"m": (Poisoned(model, 13), tok)})
    eng.start()
    try:
        bad_prefill, c1 = job([1, 13, 20, 21], 4, temp=0.0)  # fails in the prefill
        good, c2 = job([1, 20, 21], 30, temp=0.0)
        eng.submit(good)
        eng.submit(bad_prefill)
        bad_step, c3 = job([1, 20, 13], 4, temp=0.0)  # fails in a decode step
        eng.submit(bad_step)
        for c in (c1, c3):
            assert isinstance(c.wait().end, Failed) and c.end.status == 500
        c2.wait()  # decoding in the failed step's batch: failed too, or done before it
        again, c4 = job([1, 20, 21], 5, temp=0.0)
        eng.submit(again)
        assert isinstance(c4.wait().end, Done) and c4.tokens() == greedy(model, [1, 20, 21], 5)
        assert eng.alive and eng.status()["decoding_sequences"] == 0
    finally:
        eng.stop()


def test_best_of_without_a_reward_model_keeps_the_best_mean_logprob(engine):
    ids = prompts(1, seed=9)[0]
    j, every = job(ids, 8, temp=1.5, seed=3, n=4, best_of=4)
    engine.submit(j)
    every.wait()
    means = [sum(lp) / len(lp) for lp in (
        [t.logprob for e in every.events if isinstance(e, Delta) and e.index == i for t in e.tokens]
        for i in range(4))]
    assert means == sorted(means, reverse=True)  # best first
    j, best = job(ids, 8, temp=1.5, seed=3, n=1, best_of=4)  # the same 4 samples
    engine.submit(j)
    assert best.wait().tokens() == every.tokens(0)
    assert best.end.completion_tokens == every.end.completion_tokens  # all 4 counted
