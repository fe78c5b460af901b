"""``fuse``: fused logits equal base + adapter logits in every format we can load here."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_model
from typer.testing import CliRunner

from llama2_mlx.checkpoints.export import quantize, save_model
from llama2_mlx.checkpoints.fuse import fuse, read_gguf_model
from llama2_mlx.checkpoints.load import load, load_model
from llama2_mlx.formats.weights import hf_to_meta_rows, meta_to_hf_rows
from llama2_mlx.models.lora import LoRAConfig, apply_lora, lora_layers, save_adapters

TOL = 1e-4
TOKENS = [[1, 17, 200, 33, 5, 411, 90, 2, 64]]


def make_adapters(path, std, seed=3, keys=None):
    cfg = LoRAConfig(rank=4, scale=20.0, **({"keys": keys} if keys else {}))
    model = apply_lora(make_model(), cfg)
    mx.random.seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_b = std * mx.random.normal(layer.lora_b.shape)
    save_adapters(model, path, cfg)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, spm_path):
    return save_model(make_model(), tmp_path_factory.mktemp("base"), spm_path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("ad"), std=0.05)


@pytest.fixture(scope="module")
def reference(base, adapters):
    """Logits of the base model with the adapters applied (unfused)."""
    model, _ = load(base, adapter_path=adapters)
    with_adapters = np.array(model(mx.array(TOKENS)))
    without = np.array(load_model(base)(mx.array(TOKENS)))
    assert np.abs(with_adapters - without).max() > 0.1  # the adapters matter
    return with_adapters


def test_mlx_format_loads_back_in_our_runtime(base, adapters, reference, tmp_path):
    out = fuse(base, adapters, tmp_path / "fused", fmt="mlx")
    model = load_model(out)
    assert not lora_layers(model)
    diff = np.abs(np.array(model(mx.array(TOKENS))) - reference).max()
    print(f"fused vs unfused, mlx: {diff:.2e}")
    assert diff < TOL


def test_hf_format_loads_in_transformers_and_mlx_lm(base, adapters, reference, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = fuse(base, adapters, tmp_path / "hf", fmt="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization" not in config
    assert (out / "tokenizer.model").is_file() and (out / "model.safetensors").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor(TOKENS)).logits.numpy()
    d_hf = np.abs(got - reference).max()
    from mlx_lm import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(str(out))
    d_mlx_lm = np.abs(np.array(model(mx.array(TOKENS))) - reference).max()
    assert tokenizer.encode("hello world") == load(out)[1].encode("hello world")
    print(f"fused vs unfused, hf: transformers {d_hf:.2e}, mlx-lm {d_mlx_lm:.2e}")
    assert d_hf < TOL and d_mlx_lm < TOL


def explicit_interleave(w, n_heads):
    """Meta row 2j of a head is HF row j, Meta row 2j+1 is HF row j + hd/2."""
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for j in range(hd // 2):
            out[h * hd + 2 * j] = w[h * hd + j]
            out[h * hd + 2 * j + 1] = w[h * hd + hd // 2 + j]
    return out


def test_gguf_has_llama_cpp_names_metadata_vocab_and_values(base, adapters, reference, tmp_path, spm_path):
    import gguf
    import sentencepiece as spm

    path = fuse(base, adapters, tmp_path / "gguf", fmt="gguf", dtype="float32")
    assert path.name == "model-f32.gguf"
    r = gguf.GGUFReader(str(path))
    a = make_model().args

    def field(key):
        f = r.fields[key]
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]

    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.rope.dimension_count"), field("llama.context_length")) == (
            a.n_layers, a.dim, a.hidden_dim, a.n_heads, a.n_kv_heads, a.head_dim, a.max_seq_len)
    assert field("general.file_type") == 0
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == sp.vocab_size() == a.vocab_size
    assert [bytes(tokens.parts[i]).decode() for i in tokens.data[:40]] == [sp.id_to_piece(i) for i in range(40)]
    types = r.fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[i][0]) for i in types.data[:4]]
    assert kinds == [2, 3, 3, 6]  # unk, bos, eos (control), first byte piece
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)

    names = {t.name: t for t in r.tensors}
    want = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(a.n_layers) for n in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(names) == want
    assert names["blk.0.attn_k.weight"].shape.tolist() == [a.dim, a.n_kv_heads * a.head_dim]  # ne0 = in
    fused = load_model(fuse(base, adapters, tmp_path / "mlx", fmt="mlx"))
    q = np.array(fused.layers[1].self_attn.q_proj.weight)
    got_q = np.array(names["blk.1.attn_q.weight"].data).reshape(q.shape)
    np.testing.assert_array_equal(got_q, explicit_interleave(q, a.n_heads))
    k = np.array(fused.layers[0].self_attn.k_proj.weight)
    np.testing.assert_array_equal(np.array(names["blk.0.attn_k.weight"].data).reshape(k.shape),
                                  explicit_interleave(k, a.n_kv_heads))
    np.testing.assert_array_equal(meta_to_hf_rows(hf_to_meta_rows(q, a.n_heads), a.n_heads), q)

    diff = np.abs(np.array(read_gguf_model(path)(mx.array(TOKENS))) - reference).max()
    f16 = fuse(base, adapters, tmp_path / "gguf16", fmt="gguf")
    r16 = gguf.GGUFReader(str(f16))
    kinds = {t.name: t.tensor_type for t in r16.tensors}
    assert kinds["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32
    diff16 = np.abs(np.array(read_gguf_model(f16)(mx.array(TOKENS))) - reference).max()
    print(f"fused vs unfused, gguf: f32 {diff:.2e}, f16 {diff16:.2e}")
    assert diff < TOL and diff16 < 2e-2


def test_fusing_into_a_quantized_base_keeps_the_adapter(tmp_path, spm_path):
    q = make_model()
    quantize(q, bits=4, group_size=32)
    qdir = save_model(q, tmp_path / "q4", spm_path)
    ad = make_adapters(tmp_path / "ad", std=0.003)  # a small update, below the 4-bit step
    model, _ = load(qdir, adapter_path=ad)
    x = mx.array(TOKENS)
    ref = np.array(model(x))
    effect = np.abs(ref - np.array(load_model(qdir)(x))).max()

    out = fuse(qdir, ad, tmp_path / "fused", fmt="mlx")
    fused = load_model(out)
    assert isinstance(fused.lm_head, nn.QuantizedLinear)  # untouched layers stay quantized
    assert isinstance(fused.layers[0].mlp.up_proj, nn.Linear)
    ours = np.abs(np.array(fused(x)) - ref).max()
    requant = load_model(fuse(qdir, ad, tmp_path / "requant", fmt="mlx", requantize=True))
    theirs = np.abs(np.array(requant(x)) - ref).max()
    deq = load_model(fuse(qdir, ad, tmp_path / "deq", fmt="mlx", dequantize=True))
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in deq.named_modules())
    d_deq = np.abs(np.array(deq(x)) - ref).max()
    print(f"quantized base: adapter effect {effect:.3e}; fused error ours {ours:.2e}, "
          f"dequantized {d_deq:.2e}, re-quantized like mlx-lm {theirs:.2e}")
    assert ours < TOL and d_deq < TOL
    assert theirs > 0.3 * effect  # re-quantizing loses a good part of the update


def test_cli_fuse(base, adapters, tmp_path):
    from cli.app import app

    runner = CliRunner()
    r = runner.invoke(app, ["fuse", "--model", str(base), "--adapter-path", str(adapters),
                            "--out", str(tmp_path / "o"), "--format", "hf", "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    w = mx.load(str(tmp_path / "o" / "model.safetensors"))
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == mx.float16
    r = runner.invoke(app, ["fuse", "--model", str(base), "--adapter-path", str(tmp_path / "none"),
                            "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "adapter_config.json not found" in r.output
