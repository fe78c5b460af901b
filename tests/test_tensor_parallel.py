"""Tensor-parallel generation on 2 ranks (localhost, ring): each rank holds half of every
layer (and only its KV heads), the logits equal one process's within 1e-4 and the greedy
tokens are the same; a model whose KV heads do not split evenly is refused."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model
from ranks import launch, spawn

from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.distributed import World
from llama2_mlx.models.model import ModelArgs
from llama2_mlx.models.parallel import check_tensor_parallel

PROMPTS = ["hello world the quick brown fox", "one two", "please reverse spell count five"]

# Run on every rank: its slice, logits of one prompt, greedy tokens (one prompt and a
# left-padded batch), what its KV cache holds and its peak memory, written to its folder.
SCRIPT = """
import json, sys
import llama2_mlx
import mlx.core as mx
from llama2_mlx.generation.generate import GenerationConfig, batch_generate
from llama2_mlx.generation.parallel import load_for_generation
from llama2_mlx.io.distributed import start
from llama2_mlx.models.cache import make_cache

w = start()
model, tok = load_for_generation(sys.argv[1], w)
prompts = json.loads(sys.argv[2])
x = mx.array([tok.encode(prompts[0])])
cache = make_cache(model)
logits = model(x, cache=cache)
config = GenerationConfig(max_tokens=12)
out = {"logits": logits[0].tolist(), "kv_heads": cache[0].keys.shape[1],
       "one": batch_generate(model, tok, [tok.encode(prompts[0])], config),
       "batch": batch_generate(model, tok, [tok.encode(p) for p in prompts], config),
       "peak": mx.get_peak_memory(),
       "weights": sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))}
open("out.json", "w").write(json.dumps(out))
"""


def run_tp(tmp_path, model_path, n=2):
    dirs = [tmp_path / f"rank{r}" for r in range(n)]
    for d in dirs:
        d.mkdir()
    script = tmp_path / "tp.py"
    script.write_text(SCRIPT)
    with spawn([str(script), str(model_path), json.dumps(PROMPTS)], dirs,
               command=[sys.executable]) as ranks:
        codes = ranks.wait(120)
        assert codes == [0] * n, ranks.output()
    return [json.loads((d / "out.json").read_text()) for d in dirs]


def reference(model_path):
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.generation.generate import GenerationConfig, batch_generate
    from llama2_mlx.models.cache import make_cache

    model, tok = load(model_path)
    cache = make_cache(model)
    logits = model(mx.array([tok.encode(PROMPTS[0])]), cache=cache)
    config = GenerationConfig(max_tokens=12)
    return {"logits": np.array(logits[0]), "kv_heads": cache[0].keys.shape[1],
            "one": batch_generate(model, tok, [tok.encode(PROMPTS[0])], config),
            "batch": batch_generate(model, tok, [tok.encode(p) for p in PROMPTS], config)}


def test_two_ranks_give_the_logits_and_greedy_tokens_of_one_process(tmp_path, model_dir):
    """HF safetensors (each rank memory-maps its slice); the tiny GQA model: 4 query heads,
    2 KV heads, so each rank holds 2 query heads and 1 KV head."""
    ref = reference(model_dir)
    outs = run_tp(tmp_path, model_dir)
    for out in outs:
        np.testing.assert_allclose(np.array(out["logits"]), ref["logits"], atol=1e-4)
        assert out["one"] == ref["one"] and out["batch"] == ref["batch"]
        assert out["kv_heads"] == ref["kv_heads"] // 2 == 1
    full = sum(v.nbytes for v in mx.load(str(model_dir / "model.safetensors")).values())
    norms = 64 * 4 * 5 * 4 // 4  # (2 layers x 2 + 1) norms of 64 floats, replicated
    assert all(abs(out["weights"] - (full - norms) / 2 - norms) < 1 for out in outs)


@pytest.mark.slow
def test_meta_shards_load_one_per_rank_and_generate_under_mlx_launch(tmp_path, model_dir, tok):
    pytest.importorskip("torch")
    from test_parity import write_meta

    meta = tmp_path / "meta"
    write_meta(make_model(), meta, n_shards=2, tokenizer=tok.model_path)  # model_dir's weights
    ref = reference(meta)
    (tmp_path / "a").mkdir()
    for out in run_tp(tmp_path / "a", meta):
        np.testing.assert_allclose(np.array(out["logits"]), ref["logits"], atol=1e-4)
        assert out["batch"] == ref["batch"]
    args = ["generate", "--model", str(model_dir), "-p", PROMPTS[0], "--max-tokens", "12"]
    r = launch(args, tmp_path)
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr
    from typer.testing import CliRunner

    from cli.app import app

    one = CliRunner().invoke(app, args)
    assert one.exit_code == 0
    assert r.stdout == one.stdout  # the same text, printed once (rank 0)
    assert r.stderr.count("generation:") == 1


def test_kv_heads_that_do_not_split_evenly_are_refused(tmp_path):
    with pytest.raises(Llama2Error, match=r"tensor parallelism over 2 ranks needs n_kv_heads "
                                          r"\(1\) divisible by 2"):
        check_tensor_parallel(ModelArgs(dim=64, n_heads=4, n_kv_heads=1, vocab_size=512), 2)
    check_tensor_parallel(ModelArgs(dim=64, n_heads=4, n_kv_heads=2, vocab_size=512), 2)
    from llama2_mlx.checkpoints.export import save_model
    from llama2_mlx.checkpoints.sharded import load_tensor_parallel

    folder = save_model(make_model(n_kv_heads=1), tmp_path / "mqa")
    with pytest.raises(Llama2Error, match=r"needs n_kv_heads \(1\) divisible by 2"):
        load_tensor_parallel(folder, World(rank=0, size=2))


def test_generate_under_two_ranks_refuses_uneven_kv_heads_with_one_line_each(tmp_path, tok):
    from llama2_mlx.checkpoints.export import save_model

    folder = save_model(make_model(n_kv_heads=1), tmp_path / "mqa", tok.model_path)
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    for d in dirs:
        d.mkdir()
    with spawn(["generate", "--model", str(folder), "-p", "hi"], dirs) as ranks:
        assert ranks.wait(60) == [2, 2], ranks.output()
        logs = [ranks.output(r).strip().splitlines() for r in (0, 1)]
    msg = "tensor parallelism over 2 ranks needs n_kv_heads (1) divisible by 2"
    assert len(logs[0]) == 1 and logs[0][0].startswith(f"error: {msg}")
    assert len(logs[1]) == 1 and logs[1][0].startswith(f"error: rank 1 of 2: {msg}")
