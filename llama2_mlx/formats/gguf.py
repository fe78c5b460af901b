"""GGUF (llama.cpp) files: write a model's tensors and SentencePiece vocabulary, read them back.

Tensor names, and which rows are RoPE-permuted (llama.cpp keeps Meta's interleaved q/k
pairs), come from the one weight table in ``weights.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from llama2_mlx.chat.tokenizer import CHAT_TEMPLATE
from llama2_mlx.errors import Llama2Error, one_line
from llama2_mlx.formats.weights import expected_shapes, from_meta_rows, to_meta_rows, weight_table
from llama2_mlx.io.atomic import atomic_file
from llama2_mlx.io.readers import check_regular


def sentencepiece_vocab(tokenizer_path) -> tuple[list[bytes], list[float], list[int], dict]:
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


def write_gguf(model, path, tokenizer_path, dtype: str = "f16") -> Path:
    """Write an unquantized ``model`` as a llama.cpp GGUF file (``dtype`` f16 or f32)."""
    import gguf

    if dtype not in ("f16", "f32"):
        raise Llama2Error(f"gguf: --dtype must be float16 or float32 (got {dtype})")
    args = model.args
    np_dtype = np.float16 if dtype == "f16" else np.float32
    path = Path(path)
    tokens, scores, types, ids = sentencepiece_vocab(tokenizer_path)
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
        w.add_chat_template(CHAT_TEMPLATE)
        params = dict(tree_flatten(model.parameters()))
        for t in weight_table(args.n_layers):
            a = params.pop(t.internal, None)
            if a is None:
                raise Llama2Error(f"gguf: the model has no tensor {t.internal}")
            if not mx.issubdtype(a.dtype, mx.floating):
                raise Llama2Error(f"gguf: tensor {t.internal} is quantized; fuse with --dequantize")
            arr = to_meta_rows(np.array(a.astype(mx.float32)), t.spec, args)  # llama.cpp: Meta's pairs
            # llama.cpp keeps 1-D tensors (the norms) in f32.
            arr = arr if arr.ndim == 1 else arr.astype(np_dtype)
            if not np.isfinite(arr).all():  # a float16 overflow, or a diverged adapter
                raise Llama2Error(f"{path}: not written: {t.internal} holds NaN or infinite "
                                  "values" + (" in float16 (--dtype float32 keeps them)"
                                              if dtype == "f16" else ""))
            w.add_tensor(t.gguf, arr)
        if params:
            raise Llama2Error(f"gguf: no llama.cpp name for tensor {next(iter(params))}")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_gguf(path) -> tuple[dict, dict[str, mx.array]]:
    """``(ModelArgs fields, internal name -> array)`` from a GGUF file written by
    ``write_gguf`` (for checks): names and q/k rows mapped back through the table.
    A file that is not such a GGUF is one ``Llama2Error`` line naming it."""
    import gguf

    from llama2_mlx.formats.config import check_fields

    check_regular(path)
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError, struct.error, KeyError...
        raise Llama2Error(f"{path}: not a readable GGUF file ({one_line(e, 100)})") from None

    def field(key):
        f = r.fields.get(key)
        try:
            value = f.parts[f.data[0]].tolist()[0]
        except (AttributeError, IndexError, TypeError):
            raise Llama2Error(f"{path}: no usable {key} field") from None
        return value

    keys = dict(
        dim="llama.embedding_length", n_layers="llama.block_count",
        n_heads="llama.attention.head_count", n_kv_heads="llama.attention.head_count_kv",
        vocab_size="llama.vocab_size", hidden_dim="llama.feed_forward_length",
        norm_eps="llama.attention.layer_norm_rms_epsilon", rope_theta="llama.rope.freq_base",
        max_seq_len="llama.context_length",
    )
    args = {name: field(key) for name, key in keys.items()}
    try:
        check_fields(args, keys)
    except ValueError as e:
        raise Llama2Error(f"{path}: {e}") from None
    heads = SimpleNamespace(**args, head_dim=args["dim"] // args["n_heads"])
    by_gguf = {t.gguf: t for t in weight_table(args["n_layers"])}
    want = expected_shapes(heads)
    weights = {}
    for t in r.tensors:
        w = by_gguf.get(t.name)
        if w is None:
            raise Llama2Error(f"{path}: unexpected tensor {one_line(t.name, 80)}")
        # GGUF lists dimensions fastest-first: reversed, they are numpy's shape.
        shape = tuple(reversed([int(n) for n in t.shape.tolist()]))
        if shape != want[w.internal] or t.data.size != math.prod(shape):
            raise Llama2Error(f"{path}: tensor {t.name} has shape {shape}, the header's sizes "
                              f"make it {want[w.internal]}")
        arr = np.array(t.data, dtype=np.float32).reshape(shape)
        weights[w.internal] = mx.array(from_meta_rows(arr, w.spec, heads))
    return args, weights
