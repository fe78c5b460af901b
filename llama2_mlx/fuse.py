"""``llama2 fuse``: merge LoRA adapters into the base weights and export the model.

Formats: ``mlx`` (this project's folder, quantized if the base is), ``hf``
(Hugging Face folder: config.json, model.safetensors, tokenizer; loads in
transformers and mlx-lm) and ``gguf`` (one llama.cpp file, f16 or f32, with
llama.cpp's tensor names, q/k rows in Meta's interleaved RoPE order and the
SentencePiece vocabulary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from llama2_mlx.checkpoint import atomic_file
from llama2_mlx.errors import Llama2Error
from llama2_mlx.loader import DTYPES, _cast, hf_to_meta_rows, meta_to_hf_rows
from llama2_mlx.lora import dequantize_model, fuse_lora, lora_layers

FORMATS = ("mlx", "hf", "gguf")

# Internal (HF) name -> llama.cpp name; "{i}" is the layer.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def _gguf_name(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        i = parts[2]
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        if key in GGUF_NAMES:
            return GGUF_NAMES[key].format(i=i)
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    raise Llama2Error(f"gguf: no llama.cpp name for tensor {name}")


def _sentencepiece_vocab(tokenizer_path) -> tuple[list[bytes], list[float], list[int], dict]:
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return tokens, scores, types, ids


def write_gguf(model: nn.Module, path, tokenizer_path, dtype: str = "f16") -> Path:
    """Write an unquantized ``model`` as a llama.cpp GGUF file (``dtype`` f16 or f32)."""
    import gguf

    if dtype not in ("f16", "f32"):
        raise Llama2Error(f"gguf: --dtype must be float16 or float32 (got {dtype})")
    args = model.args
    np_dtype = np.float16 if dtype == "f16" else np.float32
    path = Path(path)
    tokens, scores, types, ids = _sentencepiece_vocab(tokenizer_path)
    if len(tokens) != args.vocab_size:
        raise Llama2Error(
            f"{tokenizer_path}: {len(tokens)} pieces, the model has {args.vocab_size} rows"
        )
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(path.stem)
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.hidden_dim)
        w.add_rope_dimension_count(args.head_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_rope_freq_base(args.rope_theta)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(ids["bos"])
        w.add_eos_token_id(ids["eos"])
        if ids["unk"] >= 0:
            w.add_unk_token_id(ids["unk"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        for name, a in tree_flatten(model.parameters()):
            if not mx.issubdtype(a.dtype, mx.floating):
                raise Llama2Error(f"gguf: tensor {name} is quantized; fuse with --dequantize")
            arr = np.array(a.astype(mx.float32))
            if name.endswith("self_attn.q_proj.weight"):
                arr = hf_to_meta_rows(arr, args.n_heads)  # llama.cpp wants Meta's pairs
            elif name.endswith("self_attn.k_proj.weight"):
                arr = hf_to_meta_rows(arr, args.n_kv_heads)
            # llama.cpp keeps 1-D tensors (the norms) in f32.
            w.add_tensor(_gguf_name(name), arr if arr.ndim == 1 else arr.astype(np_dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_gguf_model(path) -> nn.Module:
    """A ``Transformer`` from a GGUF file written by ``write_gguf`` (for checks)."""
    import gguf

    from llama2_mlx.model import ModelArgs, Transformer

    r = gguf.GGUFReader(str(path))

    def field(key):
        f = r.fields[key]
        return f.parts[f.data[0]].tolist()[0]

    args = ModelArgs(
        dim=field("llama.embedding_length"), n_layers=field("llama.block_count"),
        n_heads=field("llama.attention.head_count"),
        n_kv_heads=field("llama.attention.head_count_kv"),
        vocab_size=field("llama.vocab_size"), hidden_dim=field("llama.feed_forward_length"),
        norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=field("llama.rope.freq_base"), max_seq_len=field("llama.context_length"),
    )
    model = Transformer(args)
    by_gguf = {_gguf_name(k): k for k, _ in tree_flatten(model.parameters())}
    weights = []
    for t in r.tensors:
        name = by_gguf[t.name]
        arr = np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if name.endswith("self_attn.q_proj.weight"):
            arr = meta_to_hf_rows(arr, args.n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            arr = meta_to_hf_rows(arr, args.n_kv_heads)
        weights.append((name, mx.array(arr)))
    model.load_weights(weights)
    return model


def fuse_model(model: nn.Module, *, dequantize: bool = False, requantize: bool = False) -> nn.Module:
    """Merge the LoRA layers of ``model`` into its weights (see ``lora.fuse_lora``)."""
    if not lora_layers(model):
        raise Llama2Error("fuse: the model has no LoRA layers (check --adapter-path)")
    return fuse_lora(model, dequantize=dequantize, requantize=requantize)


def fuse(
    model_path, adapter_path, out, *, fmt: str = "mlx", dequantize: bool = False,
    requantize: bool = False, dtype: Optional[str] = None,
) -> Path:
    """Load ``model_path`` with the adapters of ``adapter_path``, fuse them and write the
    result to folder ``out`` in format ``fmt`` (mlx, hf or gguf). Returns the written path.

    hf and gguf are always dequantized; ``dtype`` (float32, float16, bfloat16) casts the
    float weights (gguf: float16 unless float32).
    """
    from llama2_mlx.loader import load, save_model

    if fmt not in FORMATS:
        raise Llama2Error(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if dtype is not None and dtype not in DTYPES:
        raise Llama2Error(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if fmt == "gguf" and dtype == "bfloat16":
        raise Llama2Error("--dtype bfloat16 is not written to gguf; use float16 or float32")
    model, tokenizer = load(model_path, adapter_path=adapter_path)
    fuse_model(model, dequantize=dequantize or fmt != "mlx", requantize=requantize)
    out = Path(out)
    if fmt == "gguf":
        name = "f32" if dtype == "float32" else "f16"
        return write_gguf(model, out / f"model-{name}.gguf", tokenizer.model_path, name)
    if dtype is not None:
        model.update(tree_map(lambda a: _cast(a, DTYPES[dtype]), model.parameters()))
    return save_model(model, out, tokenizer.model_path)
