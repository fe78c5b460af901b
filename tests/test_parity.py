"""Logit parity with transformers' LlamaForCausalLM (torch, float32) on the same random
weights, loaded from a Hugging Face folder and from Meta's layout (1 and 2 shards).

The Meta files are written here from the HF weights by an independent construction
(explicit row indices and split axes from Meta's layout), not by the loader's table.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY, make_model
from mlx.utils import tree_flatten

from llama2_mlx.checkpoints.export import save_model
from llama2_mlx.checkpoints.load import load, load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4

# Meta name (layer tensors with "{i}") -> (HF name, model-parallel split axis or None).
META_LAYOUT = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "layers.{i}.attention.wq.weight": ("model.layers.{i}.self_attn.q_proj.weight", 0),
    "layers.{i}.attention.wk.weight": ("model.layers.{i}.self_attn.k_proj.weight", 0),
    "layers.{i}.attention.wv.weight": ("model.layers.{i}.self_attn.v_proj.weight", 0),
    "layers.{i}.attention.wo.weight": ("model.layers.{i}.self_attn.o_proj.weight", 1),
    "layers.{i}.feed_forward.w1.weight": ("model.layers.{i}.mlp.gate_proj.weight", 0),
    "layers.{i}.feed_forward.w2.weight": ("model.layers.{i}.mlp.down_proj.weight", 1),
    "layers.{i}.feed_forward.w3.weight": ("model.layers.{i}.mlp.up_proj.weight", 0),
    "layers.{i}.attention_norm.weight": ("model.layers.{i}.input_layernorm.weight", None),
    "layers.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", None),
}


def hf_rows_to_meta(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF row j of a head holds the first element of RoPE pair j, row j + hd/2 the second;
    Meta keeps each pair on adjacent rows 2j, 2j+1."""
    hd = w.shape[0] // n_heads
    idx = np.empty(w.shape[0], dtype=np.int64)
    for h in range(n_heads):
        for j in range(hd // 2):
            idx[h * hd + 2 * j] = h * hd + j
            idx[h * hd + 2 * j + 1] = h * hd + hd // 2 + j
    return w[idx]


def write_meta(model, folder, n_shards=1, torch_dtype=None, tokenizer=None, tokenizer_up=False):
    """Write ``model`` as Meta's download: consolidated.NN.pth + params.json (vocab -1)."""
    torch_dtype = torch_dtype or torch.float32
    a = model.args
    hf = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    shards = [{} for _ in range(n_shards)]
    for meta_t, (hf_t, axis) in META_LAYOUT.items():
        for i in range(a.n_layers) if "{i}" in meta_t else [None]:
            w = hf[hf_t.format(i=i)]
            if meta_t.endswith(("wq.weight", "wk.weight")):
                w = hf_rows_to_meta(w, a.n_heads if "wq" in meta_t else a.n_kv_heads)
            parts = [w] * n_shards if axis is None else np.split(w, n_shards, axis=axis)
            for shard, p in zip(shards, parts):
                t = torch.from_numpy(np.ascontiguousarray(p))
                shard[meta_t.format(i=i)] = t.to(torch_dtype)
    folder.mkdir(parents=True, exist_ok=True)
    for k, shard in enumerate(shards):
        shard["rope.freqs"] = torch.ones(a.head_dim // 2, dtype=torch_dtype)
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
              "n_kv_heads": a.n_kv_heads, "multiple_of": a.multiple_of,
              "ffn_dim_multiplier": a.ffn_dim_multiplier, "norm_eps": a.norm_eps,
              "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, (folder.parent if tokenizer_up else folder) / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, spm_path):
    """Random weights saved as an HF folder, and transformers' logits for them."""
    model = make_model(seed=3)
    folder = save_model(model, tmp_path_factory.mktemp("parity") / "hf", spm_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 13))
    with torch.no_grad():
        logits = hf(torch.from_numpy(tokens)).logits.numpy()
    return model, folder, tokens, logits


def _max_diff(model, tokens, ref) -> float:
    return float(np.abs(np.array(model(mx.array(tokens))) - ref).max())


def test_transformers_on_hf_folder(reference):
    model, folder, tokens, ref = reference
    loaded, tok = load(folder)
    assert tok.vocab_size == TINY["vocab_size"]
    diff = _max_diff(loaded, tokens, ref)
    print(f"parity hf max_abs_diff={diff:.2e}")
    assert diff <= TOL
    assert _max_diff(model, tokens, ref) <= TOL  # the in-memory model, too


@pytest.mark.parametrize("n_shards", [1, 2])
def test_transformers_on_meta_layout(reference, tmp_path, spm_path, n_shards):
    model, _, tokens, ref = reference
    # One shard: tokenizer beside the weights; two shards: one folder up (as Meta ships 13B/70B).
    folder = write_meta(model, tmp_path / "llama-2-tiny", n_shards, tokenizer=spm_path,
                        tokenizer_up=n_shards > 1)
    loaded, tok = load(folder)
    assert loaded.args.vocab_size == TINY["vocab_size"]  # from vocab_size -1 + the embedding
    assert tok.model_path == (folder.parent if n_shards > 1 else folder) / "tokenizer.model"
    diff = _max_diff(loaded, tokens, ref)
    print(f"parity meta n_shards={n_shards} max_abs_diff={diff:.2e}")
    assert diff <= TOL
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(loaded.parameters()))


def test_meta_to_hf_conversion_equals_the_hf_folder(reference, tmp_path):
    """Meta -> convert -> HF layout gives bit-identical weights to the HF folder."""
    model, folder, _, _ = reference
    meta = write_meta(model, tmp_path / "meta", 2)
    ours = dict(tree_flatten(load_model(meta).parameters()))
    theirs = dict(tree_flatten(load_model(folder).parameters()))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert mx.array_equal(ours[k], theirs[k]).item(), k
