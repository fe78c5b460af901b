"""Speculative decoding: greedy output equal to plain decoding with both drafters and
every cache, the caches left as plain decoding leaves them, and sampled output with the
model's own distribution (the accept/reject rule)."""

import itertools
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY, make_model

import llama2_mlx.generation.speculative as spec
from llama2_mlx.generation.chat import ChatSession, format_stats
from llama2_mlx.generation.generate import (
    GenerationConfig,
    generate,
    generate_step,
    stream_generate,
)
from llama2_mlx.generation.sample import make_filter, make_logits_processors, make_sampler
from llama2_mlx.generation.speculative import (
    DraftLength,
    DraftStats,
    ModelDrafter,
    PromptLookupDrafter,
    speculative_generate_step,
)
from llama2_mlx.models.cache import KVCache, make_cache


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def small():
    """A draft model of another size, same vocabulary: its drafts are mostly wrong."""
    return make_model(seed=1, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)


def repetitive(n=30):
    return [1] + [5, 6, 7, 8, 9, 10] * (n // 6)


def random_prompt(n=12, seed=0):
    return [1] + np.random.RandomState(seed).randint(3, TINY["vocab_size"], n).tolist()


def plain_run(model, prompt, n, max_kv_size=None, processors=()):
    cache = make_cache(model, max_kv_size)
    out = [(int(t), lp) for t, lp in generate_step(model, mx.array(prompt), cache=cache,
                                                   max_tokens=n, logits_processors=processors)]
    return out, cache


def spec_run(model, prompt, n, drafter, max_kv_size=None, processors=(), k=4):
    cache, stats = make_cache(model, max_kv_size), DraftStats()
    steps = speculative_generate_step(model, mx.array(prompt), drafter, cache=cache, max_tokens=n,
                                      logits_processors=processors, num_draft_tokens=k, stats=stats)
    return [(int(t), lp) for t, lp in steps], cache, stats


def drafters(model, small):
    return {"lookup": PromptLookupDrafter(3), "small": ModelDrafter(small),
            "self": ModelDrafter(model)}


def assert_same_cache(a, b):
    for x, y in zip(a, b):
        assert x.offset == y.offset
        if isinstance(x, KVCache):
            n = x.offset
            np.testing.assert_allclose(np.array(x.keys[..., :n, :]), np.array(y.keys[..., :n, :]),
                                       atol=1e-4)
            np.testing.assert_allclose(np.array(x.values[..., :n, :]),
                                       np.array(y.values[..., :n, :]), atol=1e-4)
        else:  # bounded: the sinks and the most recent tokens both hold
            m = min(x.size, y.size) - x.keep
            for u, v in ((x.keys, y.keys), (x.values, y.values)):
                np.testing.assert_allclose(np.array(u[..., : x.keep, :]),
                                           np.array(v[..., : x.keep, :]), atol=1e-4)
                np.testing.assert_allclose(np.array(u[..., -m:, :]), np.array(v[..., -m:, :]),
                                           atol=1e-4)


def test_prompt_lookup_drafts_the_continuation_of_the_longest_recent_match():
    d = PromptLookupDrafter(3)
    assert d.draft([1, 2, 3, 9, 2, 3, 4, 7, 2, 3], 3) == ([4], None)  # latest "2 3": 1 token
    assert d.draft([1, 2, 3, 4, 8, 2, 3, 5, 1, 2, 3], 3) == ([4, 8], None)  # "1 2 3" longer
    d = PromptLookupDrafter(4)
    assert d.draft([5, 6, 7, 8, 5, 6, 7, 8], 5) == ([5, 6, 7, 8], None)  # periodic past the end
    assert d.draft([1, 2, 3], 4) == ([], None) and not d.can_draft([1, 2, 3])
    assert d.draft([1, 2, 3, 1], 4) == ([], None)  # a lone token is no match (n > 1)
    assert PromptLookupDrafter(8).draft([1, 2, 3, 4, 5, 6, 9, 1, 2, 3, 4, 5, 6], 8)[0] == [
        9, 1, 2, 3, 4, 5, 6, 9]  # a 6-gram: up to 16 tokens
    assert PromptLookupDrafter(1).draft([1, 2, 3, 1], 4) == ([2], None)
    with pytest.raises(spec.OptionError, match="prompt_lookup"):
        PromptLookupDrafter(0)


def test_draft_length_adapts_and_turns_drafting_off():
    p = DraftLength(8)
    p.update(8, 3)
    assert p.next() == 4
    p.update(4, 4)
    assert p.next() == 8
    p.update(8, 0)
    p.update(1, 0)  # two misses in a row: plain steps for a while
    assert p.next() == 0
    p.plain_step()
    assert p.next() == 1


@pytest.mark.parametrize("max_kv_size", [None, 24])
@pytest.mark.parametrize("prompt", ["repetitive", "random"])
def test_greedy_equals_plain_decoding_with_every_drafter(model, small, max_kv_size, prompt):
    ids = repetitive() if prompt == "repetitive" else random_prompt()
    want, plain_cache = plain_run(model, ids, 40, max_kv_size)
    for name, drafter in drafters(model, small).items():
        got, cache, stats = spec_run(model, ids, 40, drafter, max_kv_size)
        assert [t for t, _ in got] == [t for t, _ in want], name
        np.testing.assert_allclose(np.array(mx.stack([lp for _, lp in got])),
                                   np.array(mx.stack([lp for _, lp in want])), atol=1e-3)
        assert_same_cache(cache, plain_cache)
        assert stats.drafted > 0, name
        if name == "self" and max_kv_size is None:
            assert stats.acceptance_rate > 0.9
        if name == "small":
            assert stats.acceptance_rate < 0.5  # mostly wrong drafts, the same output
        if name == "lookup" and prompt == "repetitive" and max_kv_size is None:
            assert stats.accepted > 0


def test_greedy_with_a_repetition_penalty_equals_plain_decoding(model, small):
    processors = make_logits_processors(1.3, 8)
    want, _ = plain_run(model, repetitive(), 30, processors=processors)
    for name, drafter in drafters(model, small).items():
        got, _, stats = spec_run(model, repetitive(), 30, drafter, processors=processors)
        assert [t for t, _ in got] == [t for t, _ in want], name


def test_a_bounded_cache_past_its_window_drafts_only_what_it_can_trim(model):
    ids = repetitive(60)
    want, _ = plain_run(model, ids, 30, max_kv_size=16)
    seen = []

    class Spy(PromptLookupDrafter):
        def draft(self, tokens, k, dist=None, processors=()):
            seen.append(k)
            return super().draft(tokens, k, dist, processors)

    got, _, _ = spec_run(model, ids, 30, Spy(3), max_kv_size=16, k=6)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert seen and max(seen) == 1  # a full bounded cache trims one token exactly


def test_stream_generate_and_generate_with_speculation(model, tok):
    ids = tok.encode("the quick brown fox the quick brown fox the quick", bos=True)
    plain = GenerationConfig(max_tokens=24)
    for extra in ({"prompt_lookup": 2}, {"prompt_lookup": 3, "num_draft_tokens": 2}):
        config = GenerationConfig(max_tokens=24, **extra)
        assert generate(model, tok, ids, config) == generate(model, tok, ids, plain)
        last = list(stream_generate(model, tok, ids, config))[-1]
        assert last.drafted_tokens is not None and last.generation_tokens == 24
        assert 0 <= last.acceptance_rate <= 1 and "speculative:" in format_stats(last)
    text = generate(model, tok, ids, plain, drafter=ModelDrafter(model))
    assert text == generate(model, tok, ids, plain)
    assert list(stream_generate(model, tok, ids, plain))[-1].acceptance_rate is None


def _cache_arrays(pc):
    n = pc.cache[0].offset
    return [np.array(c.keys[..., :n, :]) for c in pc.cache]


def test_chat_with_speculation_answers_and_caches_exactly_as_without(model, small, tok):
    config = GenerationConfig(max_tokens=12)
    turns = ["hello there", "count one two three one two three", "and then?", "again"]
    plain = ChatSession(model, tok, config, system="be brief")
    sessions = {"lookup": ChatSession(model, tok, GenerationConfig(max_tokens=12, prompt_lookup=2),
                                      system="be brief"),
                "small": ChatSession(model, tok, config, system="be brief",
                                     drafter=ModelDrafter(small)),
                "self": ChatSession(model, tok, config, system="be brief",
                                    drafter=ModelDrafter(model))}
    for turn in turns:
        ref = list(plain.send(turn))
        want = "".join(r.text for r in ref)
        for name, s in sessions.items():
            got = list(s.send(turn))
            assert "".join(r.text for r in got) == want, name
            assert got[-1].cached_tokens == ref[-1].cached_tokens, name
            assert s.prompt_cache.tokens == plain.prompt_cache.tokens, name
            assert all(c.offset == len(s.prompt_cache.tokens) for c in s.prompt_cache.cache)
            for a, b in zip(_cache_arrays(s.prompt_cache), _cache_arrays(plain.prompt_cache)):
                np.testing.assert_allclose(a, b, atol=1e-4)
    assert sessions["self"].drafter.held  # one draft cache kept across the turns
    assert got[-1].drafted_tokens > 0


# ----------------------------------------------------------------------------- sampling

V = 4
# Next-token logits given the last token: the target's and a draft model's (different).
P_TABLE = np.log(np.array([[0.1, 0.5, 0.3, 0.1], [0.6, 0.1, 0.1, 0.2],
                           [0.25, 0.25, 0.4, 0.1], [0.1, 0.2, 0.3, 0.4]], np.float32))
Q_TABLE = np.log(np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7],
                           [0.1, 0.7, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]], np.float32))


class TableModel:
    """A fake model: the logits at each position are a fixed table row of its token."""

    def __init__(self, table):
        self.table = mx.array(table)
        self.layers = [None]
        self.args = type("Args", (), {"vocab_size": V})()

    def __call__(self, x, cache=None):
        for c in cache:
            c.offset += x.shape[1]  # trim() and the offset are all the caches do here
        return self.table[x]


def exact_distribution(prompt, n, dist):
    """Probabilities of every n-token continuation under the target and ``dist``."""
    out = {}
    for seq in itertools.product(range(V), repeat=n):
        p, last = 1.0, prompt[-1]
        for t in seq:
            p *= float(mx.exp(dist(mx.array(P_TABLE[last][None])))[0, t])
            last = t
        out[seq] = p
    return out


def empirical(prompt, n, drafter_of, config, N):
    mx.random.seed(0)
    target, dist = TableModel(P_TABLE), config.make_filter()
    counts = Counter()
    for _ in range(N):
        steps = speculative_generate_step(target, mx.array(prompt), drafter_of(), cache=[KVCache()],
                                          dist=dist, max_tokens=n, num_draft_tokens=3)
        counts[tuple(int(t) for t, _ in steps)] += 1
    return counts


def chi_square_pvalue(counts, probs, N):
    from scipy.stats import chi2

    stat = sum((counts.get(s, 0) - N * p) ** 2 / (N * p) for s, p in probs.items() if p > 0)
    impossible = sum(c for s, c in counts.items() if probs.get(s, 0) == 0)
    return 0.0 if impossible else float(chi2.sf(stat, sum(p > 0 for p in probs.values()) - 1))


CASES = {
    "draft model": lambda: ModelDrafter(TableModel(Q_TABLE)),
    "prompt lookup": lambda: PromptLookupDrafter(2),
}


@pytest.mark.parametrize("drafter", list(CASES))
def test_sampling_follows_the_target_distribution(drafter, monkeypatch):
    prompt, n, N = [0, 1, 2, 3, 0, 1, 2, 3, 0], 3, 3000
    config = GenerationConfig(temp=0.8, top_k=3)
    probs = exact_distribution(prompt, n, config.make_filter())
    counts = empirical(prompt, n, CASES[drafter], config, N)
    assert chi_square_pvalue(counts, probs, N) > 1e-3
    # The test sees a broken rule: always accepting the drafts gives the drafts' distribution.
    monkeypatch.setattr(spec, "_accepted", lambda logp, drafts, q: len(drafts))
    broken = empirical(prompt, n, CASES[drafter], config, N)
    assert chi_square_pvalue(broken, probs, N) < 1e-6


def test_the_filter_is_the_distribution_the_sampler_draws_from():
    logits = mx.array([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
    for options in ({"temp": 1.0}, {"temp": 0.7, "top_p": 0.8}, {"temp": 1.2, "top_k": 3},
                    {"temp": 1.0, "min_p": 0.2}):
        p = np.exp(np.array(make_filter(**options)(logits)))[0]
        mx.random.seed(0)
        draws = np.array(make_sampler(**options)(mx.broadcast_to(logits, (20000, 6))))
        freq = np.bincount(draws, minlength=6) / 20000
        np.testing.assert_allclose(freq, p, atol=0.015)
        assert ((p == 0) == (freq == 0)).all()
    assert make_filter(0.0) is None


# ----------------------------------------------------------------------------- the CLI


def invoke(*args, input=None):
    from typer.testing import CliRunner

    from cli.app import app

    return CliRunner().invoke(app, list(args), input=input)


PROMPT = "the quick brown fox the quick brown fox the quick brown"


def test_cli_generate_with_prompt_lookup_and_a_draft_model(plain_dir, small, tmp_path, spm_path):
    from llama2_mlx.checkpoints.export import save_model

    base = ["generate", "-m", str(plain_dir), "-p", PROMPT, "--max-tokens", "16"]
    plain = invoke(*base)
    assert plain.exit_code == 0, plain.stderr
    assert "speculative" not in plain.stderr
    lookup = invoke(*base, "--prompt-lookup", "3", "--num-draft-tokens", "5")
    assert lookup.exit_code == 0, lookup.stderr
    assert lookup.stdout == plain.stdout and "drafted tokens accepted" in lookup.stderr
    draft_dir = save_model(small, tmp_path / "draft", spm_path)
    drafted = invoke(*base, "--draft-model", str(draft_dir))
    assert drafted.exit_code == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and "drafted tokens accepted" in drafted.stderr


def test_cli_chat_with_prompt_lookup_answers_as_without(model_dir):
    turns = "count one two three one two three\nand again\n"
    plain = invoke("chat", "-m", str(model_dir), "--max-tokens", "10", input=turns)
    assert plain.exit_code == 0, plain.stderr
    lookup = invoke("chat", "-m", str(model_dir), "--max-tokens", "10", "--prompt-lookup", "2",
                    input=turns)
    assert lookup.exit_code == 0, lookup.stderr
    assert lookup.stdout == plain.stdout


@pytest.mark.parametrize("args, message", [
    (["--prompt-lookup", "0"], "error: --prompt-lookup must be >= 1, got 0"),
    (["--num-draft-tokens", "-1"], "error: --num-draft-tokens must be >= 1, got -1"),
    # an n-gram index per size and a draft per token: bounded (10**12 hung, building it)
    (["--prompt-lookup", "1000000000000"],
     "error: --prompt-lookup must be at most 64 (got 1000000000000)"),
    (["--prompt-lookup", "2", "--num-draft-tokens", "100000"],
     "error: --num-draft-tokens must be at most 64 (got 100000)"),
    (["--prompt-lookup", "2", "--draft-model", "x"],
     "error: give --prompt-lookup or --draft-model, not both"),
])
def test_cli_bad_speculative_options_are_one_line_errors(plain_dir, args, message):
    for command in (["generate", "-p", "hi"], ["chat"]):
        r = invoke(*command, "-m", str(plain_dir), *args)
        assert r.exit_code == 2 and r.stderr.strip() == message, r.stderr


def test_cli_a_draft_model_with_another_vocabulary_is_refused(plain_dir):
    from pathlib import Path

    import llama2_mlx.demo as demo

    demo_dir = Path(demo.__file__).parent / "assets"  # 1024 pieces, the tiny model 512
    r = invoke("generate", "-m", str(plain_dir), "-p", "hi", "--draft-model", str(demo_dir))
    assert r.exit_code == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --draft-model has a vocabulary of 1024")
    r = invoke("generate", "-m", str(plain_dir), "-p", "hi", "--draft-model", str(plain_dir / "nope"))
    assert r.exit_code == 2 and r.stderr.startswith("error: --draft-model "), r.stderr
