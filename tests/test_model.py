import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY, make_model

from llama2_mlx.models.cache import (
    KVCache,
    SharedPrefixKVCache,
    cache_nbytes,
    fork,
    make_cache,
)
from llama2_mlx.models.model import PRESETS, ModelArgs


def test_presets_match_the_paper():
    assert PRESETS["7B"].hidden_dim == 11008
    assert PRESETS["13B"].hidden_dim == 13824
    a70 = PRESETS["70B"]
    assert (a70.hidden_dim, a70.n_kv_heads, a70.head_dim) == (28672, 8, 128)


def test_from_dict_meta_and_hf_ignore_unknown_keys():
    meta = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
            "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1, "foo": 1}
    a = ModelArgs.from_dict({k: v for k, v in meta.items() if k != "vocab_size"})
    assert a.hidden_dim == 28672 and a.n_kv_heads == 8
    hf = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100,
          "rms_norm_eps": 1e-6, "torch_dtype": "float16"}
    b = ModelArgs.from_dict(hf)
    assert (b.dim, b.n_kv_heads, b.hidden_dim, b.norm_eps) == (64, 2, 96, 1e-6)
    assert ModelArgs.from_dict(b.to_hf_config()) == b


def test_cached_decode_equals_full_forward(tiny_model):
    tokens = mx.array(np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 21)))
    full = tiny_model(tokens)
    cache = make_cache(tiny_model)
    # Prefill in two chunks, then decode one token at a time.
    outs = [tiny_model(tokens[:, :7], cache=cache), tiny_model(tokens[:, 7:12], cache=cache)]
    outs += [tiny_model(tokens[:, i : i + 1], cache=cache) for i in range(12, 21)]
    np.testing.assert_allclose(np.array(mx.concatenate(outs, 1)), np.array(full), atol=1e-5)
    assert cache[0].offset == 21


def test_cache_bytes_formula(tiny_model):
    a = tiny_model.args
    for dtype in (mx.float32, mx.bfloat16):
        model = make_model(dtype=dtype)
        cache = make_cache(model)
        model(mx.zeros((3, 10), mx.int32), cache=cache)
        model(mx.zeros((3, 1), mx.int32), cache=cache)
        expected = 2 * a.n_layers * 3 * a.n_kv_heads * 11 * a.head_dim * dtype.size
        assert cache_nbytes(cache) == expected
        assert cache[0].keys.shape[1] == a.n_kv_heads  # KV heads never repeated


def test_batched_left_padding_equals_one_by_one(tiny_model):
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, 500, n).tolist() for n in (5, 9, 2)]
    L = max(map(len, prompts))
    pads = [L - len(p) for p in prompts]
    batch = mx.array([[0] * pad + p for pad, p in zip(pads, prompts)])
    cache = make_cache(tiny_model, left_padding=pads)
    logits = tiny_model(batch, cache=cache)
    nxt = mx.array([[7], [8], [9]])
    step = tiny_model(nxt, cache=cache)
    for i, p in enumerate(prompts):
        ref = tiny_model(mx.array([p + [7 + i]]))
        np.testing.assert_allclose(np.array(logits[i, pads[i]:]), np.array(ref[0, :-1]), atol=1e-5)
        np.testing.assert_allclose(np.array(step[i, 0]), np.array(ref[0, -1]), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (2 query heads per KV head) and MHA
def test_shared_prefix_cache_equals_each_sequence_on_its_own(kv_heads):
    model = make_model(n_kv_heads=kv_heads)
    a = model.args
    rng = np.random.RandomState(2)
    prompt = rng.randint(3, 500, 9).tolist()
    K = 3
    rest = rng.randint(3, 500, (K, 6))  # each sequence's own continuation
    cache = make_cache(model)
    model(mx.array([prompt]), cache=cache)
    prompt_bytes = cache_nbytes(cache)
    cache = fork(cache, K)
    assert all(isinstance(c, SharedPrefixKVCache) for c in cache)
    # A chunk of 4 new tokens per row (causal within it), then one at a time.
    outs = [model(mx.array(rest[:, :4]), cache=cache)]
    outs += [model(mx.array(rest[:, i : i + 1]), cache=cache) for i in (4, 5)]
    got = np.array(mx.concatenate(outs, axis=1))
    for i in range(K):
        ref = model(mx.array([prompt + rest[i].tolist()]))[0, len(prompt):]
        np.testing.assert_allclose(got[i], np.array(ref), atol=1e-5)
    assert cache[0].offset == len(prompt) + 6
    # The prompt's keys and values are held once, not K times.
    own = 2 * a.n_layers * K * kv_heads * 6 * a.head_dim * 4
    assert cache_nbytes(cache) == prompt_bytes + own
    assert cache[0].prefix_keys.shape[0] == 1


def test_fork_repeats_what_it_cannot_share(tiny_model):
    bounded = make_cache(tiny_model, max_kv_size=8)
    tiny_model(mx.zeros((1, 5), mx.int32), cache=bounded)
    forked = fork(bounded, 3)
    assert forked[0] is bounded[0] and bounded[0].keys.shape[0] == 3
    empty = fork(make_cache(tiny_model), 3)  # a 1-token prompt leaves nothing to share
    assert isinstance(empty[0], KVCache) and empty[0].keys is None


def _windowed_reference(model, tokens, max_size, keep):
    """Full forward with an explicit sinks+window mask."""
    T = tokens.shape[1]
    q = mx.arange(T)[:, None]
    k = mx.arange(T)[None]
    mask = (k <= q) & ((k < keep) | (k > q - (max_size - keep)))
    return model(tokens, mask=mask)


@pytest.mark.parametrize("chunks", [[1] * 30, [10, 7, 1, 1, 5, 1, 1, 1, 1, 1, 1]])
def test_bounded_cache_holds_its_bound_and_matches_window_attention(tiny_model, chunks):
    tokens = mx.array(np.random.RandomState(2).randint(0, 500, (1, sum(chunks))))
    cache = make_cache(tiny_model, max_kv_size=8)
    outs, pos = [], 0
    for n in chunks:
        outs.append(tiny_model(tokens[:, pos : pos + n], cache=cache))
        pos += n
        assert all(c.size <= 8 for c in cache)
    ref = _windowed_reference(tiny_model, tokens, 8, 4)
    np.testing.assert_allclose(np.array(mx.concatenate(outs, 1)), np.array(ref), atol=1e-5)
    a = tiny_model.args
    assert cache_nbytes(cache) == 2 * a.n_layers * a.n_kv_heads * 8 * a.head_dim * 4


def test_eval_mode_switches_dropout_off_and_gives_back_the_mode_it_found():
    import mlx.nn as nn

    from llama2_mlx.models.model import eval_mode

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    x = mx.ones((2, 4))
    with eval_mode(model):
        assert not any(m.training for _, m in model.named_modules())
        assert mx.array_equal(model(x), model(x))  # no dropout
    assert all(m.training for _, m in model.named_modules())
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("a failure inside the block")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training  # an eval-mode model stays in eval mode
