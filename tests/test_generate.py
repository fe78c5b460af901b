from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY

from llama2_mlx.errors import Llama2Error
from llama2_mlx.generation.chat import ChatSession, format_stats
from llama2_mlx.generation.generate import (
    GenerationConfig,
    StopStrings,
    batch_generate,
    generate,
    generate_step,
    prompt_ids,
    sample_k,
    stream_generate,
)
from llama2_mlx.generation.sample import make_logits_processors
from llama2_mlx.models.cache import make_cache


@pytest.fixture(scope="module")
def model():
    from conftest import make_model

    return make_model()


def prompts(n=3, seed=0):
    rng = np.random.RandomState(seed)
    return [[1] + rng.randint(3, TINY["vocab_size"], rng.randint(2, 9)).tolist() for _ in range(n)]


def greedy_reference(model, ids, n, processors=()):
    """Greedy decoding by full forwards without any cache."""
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(mx.array([ids]))[:, -1].astype(mx.float32)
        for p in processors:
            logits = p(mx.array(ids), logits)
        out.append(mx.argmax(logits, axis=-1).item())
        ids.append(out[-1])
    return out


def take(steps, n):
    return [int(t) for t, _ in (next(steps) for _ in range(n))]


class ForceToken:
    """Wraps a model so that ``token`` wins once the cache holds ``at`` positions."""

    def __init__(self, model, token, at):
        self.model, self.token, self.at = model, token, at
        self.layers = model.layers

    def __call__(self, x, cache=None, mask=None):
        logits = self.model(x, cache=cache)
        if cache[0].offset >= self.at:
            logits = logits + 1e4 * (mx.arange(logits.shape[-1]) == self.token)
        return logits


def test_generate_step_greedy_equals_full_forwards_with_chunked_prefill(model):
    ids = prompts(1)[0] + [5, 6, 7]
    ref = greedy_reference(model, ids, 6)
    for step in (512, 3, 1):
        assert take(generate_step(model, ids, prefill_step=step), 6) == ref
    token, logprobs = next(generate_step(model, mx.array(ids)))
    assert token.shape == () and logprobs.shape == (TINY["vocab_size"],)
    assert abs(mx.logsumexp(logprobs).item()) < 1e-4


def test_generate_step_max_tokens_and_max_kv_size(model):
    ids = prompts(1)[0]
    cache = make_cache(model)
    assert len(list(generate_step(model, ids, cache=cache, max_tokens=4))) == 4
    assert cache[0].offset == len(ids) + 3  # the last token is never fed back
    cache = make_cache(model, max_kv_size=8)
    list(generate_step(model, ids, cache=cache, max_tokens=12))
    assert all(c.size <= 8 for c in cache)


def test_repetition_penalty_in_decoding(model):
    ids = prompts(1)[0]
    procs = make_logits_processors(3.0, context_size=None)
    ref = greedy_reference(model, ids, 6, procs)
    assert take(generate_step(model, ids, logits_processors=procs), 6) == ref


def test_stream_generate_text_stats_and_length(model, tok):
    ids = prompt_ids(tok, "the quick brown fox")
    assert ids == [tok.bos_id] + tok.encode("the quick brown fox", bos=False)
    config = GenerationConfig(max_tokens=7)
    rs = list(stream_generate(model, tok, ids, config))
    assert len(rs) == 7 and [r.finish_reason for r in rs] == [None] * 6 + ["length"]
    tokens = [r.token for r in rs]
    assert tokens == greedy_reference(model, ids, 7)
    assert "".join(r.text for r in rs) == tok.decode(tokens) == generate(model, tok, ids, config)
    last = rs[-1]
    a = model.args
    assert (last.prompt_tokens, last.generation_tokens) == (len(ids), 7)
    assert last.kv_cache_bytes == 2 * a.n_layers * a.n_kv_heads * a.head_dim * 4 * (len(ids) + 6)
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0


def test_stream_generate_stops_at_eos(model, tok):
    ids = prompt_ids(tok, "hello world")
    forced = ForceToken(model, tok.eos_id, len(ids) + 3)
    rs = list(stream_generate(forced, tok, ids, GenerationConfig(max_tokens=50)))
    assert rs[-1].finish_reason == "stop" and rs[-1].token == tok.eos_id
    assert rs[-1].generation_tokens == 4  # 3 tokens, then EOS
    assert "".join(r.text for r in rs) == tok.decode([r.token for r in rs[:-1]])


def test_stop_strings_streaming():
    s = StopStrings(["STOP", "xy"])
    out = [s.add(c) for c in ["ab", "cS", "TO", "x", "!S", "TOP and more"]]
    assert out == ["ab", "c", "", "STO", "x!", ""]
    assert s.hit and s.flush() == ""
    s = StopStrings(["abc"])
    assert s.add("zab") == "z" and s.flush() == "ab" and not s.hit
    assert StopStrings([]).add("anything") == "anything"


def test_stream_generate_cuts_at_a_stop_string(model, tok):
    ids = prompt_ids(tok, "one two three")
    config = GenerationConfig(max_tokens=24)
    full = generate(model, tok, ids, config)
    stop = full[8:11]
    assert len(full) > 12 and stop.strip()
    config.stop = [stop, "never-seen"]
    rs = list(stream_generate(model, tok, ids, config))
    text = "".join(r.text for r in rs)
    assert text == full[: full.find(stop)] and rs[-1].finish_reason == "stop"
    assert len(rs) < 24


def test_seed_reproducibility(model, tok):
    ids = prompt_ids(tok, "hello")
    cfg = dict(max_tokens=10, temp=1.0, top_p=0.95, top_k=100, repetition_penalty=1.2)
    a = generate(model, tok, ids, GenerationConfig(seed=3, **cfg))
    b = generate(model, tok, ids, GenerationConfig(seed=3, **cfg))
    c = generate(model, tok, ids, GenerationConfig(seed=4, **cfg))
    assert a == b and a != c


@pytest.mark.parametrize("penalty", [None, 1.5])
def test_batched_generation_equals_one_by_one(model, penalty):
    ps = prompts(4, seed=1)
    assert len({len(p) for p in ps}) > 1  # really left-padded
    config = GenerationConfig(max_tokens=6, repetition_penalty=penalty)
    procs = config.make_logits_processors()
    refs = [take(generate_step(model, p, logits_processors=procs), 6) for p in ps]
    # Pick an "EOS" that one sequence emits early, so rows finish at different steps.
    eos = refs[0][2]
    want = [r[: r.index(eos)] if eos in r else r for r in refs]
    got = batch_generate(model, SimpleNamespace(eos_id=eos, vocab_size=None), ps, config)
    assert got == want and len(got[0]) == 2


def test_sample_k_greedy_equals_generate_and_seeded_samples(model, tok):
    ids = prompts(1, seed=2)[0]
    config = GenerationConfig(max_tokens=6)
    ref = greedy_reference(model, ids, 6)
    assert sample_k(model, ids, 3, config, eos_id=tok.eos_id) == ([ref] * 3, [False] * 3)
    one = greedy_reference(model, ids[:1], 6)  # a 1-token prompt: nothing to prefill
    assert sample_k(model, ids[:1], 2, config, eos_id=tok.eos_id) == ([one] * 2, [False] * 2)
    config = GenerationConfig(max_tokens=6, temp=1.0, seed=11)
    a = sample_k(model, ids, 4, config, eos_id=tok.eos_id)
    assert a == sample_k(model, ids, 4, config, eos_id=tok.eos_id)
    assert len({tuple(s) for s in a.tokens}) > 1 and all(len(s) <= 6 for s in a.tokens)
    assert a.finished == [len(s) < 6 for s in a.tokens]


def test_sample_k_cuts_at_eos_and_reports_which_rows_finished(model):
    ids = prompts(1, seed=2)[0]
    forced = ForceToken(model, 2, len(ids) + 1)
    assert sample_k(forced, ids, 2, GenerationConfig(max_tokens=6), eos_id=2) == (
        [greedy_reference(model, ids, 1)] * 2, [True, True])
    # EOS as the 6th token: finished with max_tokens 6, cut off (same tokens) with 5.
    forced = ForceToken(model, 2, len(ids) + 5)
    five = [greedy_reference(model, ids, 5)] * 2
    assert sample_k(forced, ids, 2, GenerationConfig(max_tokens=6), eos_id=2) == (five, [True] * 2)
    assert sample_k(forced, ids, 2, GenerationConfig(max_tokens=5), eos_id=2) == (five, [False] * 2)


def test_chat_session_keeps_history(model, tok):
    session = ChatSession(model, tok, GenerationConfig(max_tokens=3), system="be brief")
    first = "".join(r.text for r in session.send("hello"))
    second = "".join(r.text for r in session.send("more"))
    roles = [m["role"] for m in session.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first and session.messages[4]["content"] == second
    session.reset()
    assert session.messages == [{"role": "system", "content": "be brief"}]


def test_prompt_ids_chat_format(tok):
    user = {"role": "user", "content": "hi"}
    assert prompt_ids(tok, "hi", chat=True) == tok.encode_chat([user])
    sys_msg = {"role": "system", "content": "S"}
    assert prompt_ids(tok, "hi", system="S") == tok.encode_chat([sys_msg, user])


def test_bad_requests_are_one_line_errors(model, tok):
    with pytest.raises(Llama2Error, match="no tokens"):
        generate(model, tok, [], GenerationConfig())
    with pytest.raises(Llama2Error, match="max_tokens"):
        generate(model, tok, [1], GenerationConfig(max_tokens=0))
    with pytest.raises(Llama2Error, match="top_p"):
        batch_generate(model, tok, [[1]], GenerationConfig(temp=1, top_p=2))
    with pytest.raises(Llama2Error, match="max-kv-size"):
        batch_generate(model, tok, [[1, 2], [1]], GenerationConfig(max_kv_size=16))


def test_padded_vocabulary_never_samples_undecodable_ids(spm_path):
    """An embedding with more rows than tokenizer pieces (e.g. 32001): the extra ids are masked."""
    from conftest import make_model

    from llama2_mlx.chat.tokenizer import Tokenizer
    from llama2_mlx.generation.generate import (
        GenerationConfig,
        batch_generate,
        generate,
    )

    tok = Tokenizer(spm_path)
    model = make_model(vocab_size=tok.vocab_size + 64)
    # Make the extra rows the most likely tokens by far.
    w = model.lm_head.weight
    model.lm_head.weight = mx.concatenate([w[: tok.vocab_size], 100 * w[tok.vocab_size :]], 0)
    config = GenerationConfig(max_tokens=8, temp=1.0, seed=0)
    text = generate(model, tok, tok.encode("hello"), config)
    assert isinstance(text, str)
    rows = batch_generate(model, tok, [tok.encode("hello"), tok.encode("a b c")], config)
    assert all(t < tok.vocab_size for row in rows for t in row)
    k = sample_k(model, tok.encode("hello"), 4, config, tok.eos_id, tok.vocab_size).tokens
    assert all(t < tok.vocab_size for row in k for t in row) and sum(map(len, k)) > 0
    # Without the guard the extra rows win (so the test above can fail).
    assert any(t >= tok.vocab_size for row in sample_k(model, tok.encode("hello"), 4, config,
                                                        tok.eos_id).tokens for t in row)


def test_prompt_cache_reuses_the_shared_prefix_only():
    from conftest import make_model

    from llama2_mlx.models.cache import PromptCache

    model = make_model()
    pc = PromptCache(model)
    model(mx.array([[5, 6, 7, 8]]), cache=pc.cache)
    pc.tokens = [5, 6, 7, 8]
    assert pc.reuse([5, 6, 9, 9, 9]) == 2 and pc.cache[0].offset == 2
    assert pc.reuse([5, 6]) == 1  # at least one token is left to run
    assert pc.reuse([1, 2, 3]) == 0 and pc.cache[0].offset == 0


def test_chat_reuses_the_cache_and_answers_exactly_as_without(model, tok):
    config = GenerationConfig(max_tokens=6, repetition_penalty=1.5, repetition_context_size=256)
    turns = ["hello there", "count to three", "and then?"]
    reused, fresh = ChatSession(model, tok, config, system="be brief"), ChatSession(
        model, tok, config, system="be brief", reuse_cache=False)
    for i, turn in enumerate(turns):
        a = list(reused.send(turn))
        b = list(fresh.send(turn))
        assert "".join(r.text for r in a) == "".join(r.text for r in b)
        np.testing.assert_allclose(np.array(a[-1].logprobs), np.array(b[-1].logprobs), atol=1e-4)
        assert a[-1].prompt_tokens == b[-1].prompt_tokens
        # The previous turn's whole prompt came from the cache (a random model's answers
        # need not re-encode to the tokens it sampled; from there on the prompt is re-run).
        assert a[-1].cached_tokens >= (prev if i else 0) and b[-1].cached_tokens == 0
        prev = a[-1].prompt_tokens
    assert reused.messages == fresh.messages
    assert "from the cache" in format_stats(a[-1])
