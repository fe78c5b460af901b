"""The one weight table, the q/k RoPE permutation, dtypes and the one state-dict check.

Every reader and writer of weights (Meta ``.pth`` shards, Hugging Face and this
project's safetensors, GGUF) renames through ``WEIGHTS``: for each tensor its internal
name (= Hugging Face's), Meta's name, llama.cpp's GGUF name, the axis along which Meta's
model-parallel shards split it, and whether its rows are RoPE-permuted between Meta's
interleaved pairs and the rotate-half order (q and k). ``check_state_dict`` is the one
check of a set of loaded tensors against what a model expects: base weights, adapters,
reward heads and training checkpoints all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import mlx.core as mx
import numpy as np

from llama2_mlx.errors import Llama2Error

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass(frozen=True)
class TensorSpec:
    """One weight of a Llama 2 model under each naming scheme ("{i}": the layer index)."""

    internal: str  # this project's name = Hugging Face's
    meta: str
    gguf: str  # llama.cpp's
    meta_axis: Optional[int]  # concatenation axis of Meta's model-parallel shards; None: replicated
    rope_heads: Optional[str] = None  # ModelArgs field: rows permuted interleaved <-> rotate-half


_L, _M, _G = "model.layers.{i}.", "layers.{i}.", "blk.{i}."
WEIGHTS: tuple[TensorSpec, ...] = (
    TensorSpec("model.embed_tokens.weight", "tok_embeddings.weight", "token_embd.weight", 1),
    TensorSpec(_L + "self_attn.q_proj.weight", _M + "attention.wq.weight", _G + "attn_q.weight", 0,
               "n_heads"),
    TensorSpec(_L + "self_attn.k_proj.weight", _M + "attention.wk.weight", _G + "attn_k.weight", 0,
               "n_kv_heads"),
    TensorSpec(_L + "self_attn.v_proj.weight", _M + "attention.wv.weight", _G + "attn_v.weight", 0),
    TensorSpec(_L + "self_attn.o_proj.weight", _M + "attention.wo.weight",
               _G + "attn_output.weight", 1),
    TensorSpec(_L + "mlp.gate_proj.weight", _M + "feed_forward.w1.weight", _G + "ffn_gate.weight", 0),
    TensorSpec(_L + "mlp.down_proj.weight", _M + "feed_forward.w2.weight", _G + "ffn_down.weight", 1),
    TensorSpec(_L + "mlp.up_proj.weight", _M + "feed_forward.w3.weight", _G + "ffn_up.weight", 0),
    TensorSpec(_L + "input_layernorm.weight", _M + "attention_norm.weight",
               _G + "attn_norm.weight", None),
    TensorSpec(_L + "post_attention_layernorm.weight", _M + "ffn_norm.weight",
               _G + "ffn_norm.weight", None),
    TensorSpec("model.norm.weight", "norm.weight", "output_norm.weight", None),
    TensorSpec("lm_head.weight", "output.weight", "output.weight", 0),
)
IGNORED_META = {"rope.freqs"}  # precomputed RoPE frequencies
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Weight:
    """One tensor of a model of a given depth: its names and its spec."""

    internal: str
    meta: str
    gguf: str
    spec: TensorSpec


def weight_table(n_layers: int) -> list[Weight]:
    """Every weight of a ``n_layers``-deep model, with its names under each scheme."""
    out = []
    for spec in WEIGHTS:
        layers = range(n_layers) if "{i}" in spec.internal else [None]
        for i in layers:
            out.append(Weight(spec.internal.format(i=i), spec.meta.format(i=i),
                              spec.gguf.format(i=i), spec))
    return out


def _spec_shapes(args) -> dict[str, tuple[int, ...]]:
    """Internal name pattern -> shape, for ``args`` (a ModelArgs)."""
    d, v, f = args.dim, args.vocab_size, args.hidden_dim
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = [(v, d), (q, d), (kv, d), (kv, d), (d, q), (f, d), (d, f), (f, d), (d,), (d,), (d,),
              (v, d)]
    return {spec.internal: shape for spec, shape in zip(WEIGHTS, shapes)}


def expected_shapes(args) -> dict[str, tuple[int, ...]]:
    """Internal name -> shape of every weight of the (unquantized) model ``args`` describes,
    worked out from the sizes alone: nothing is allocated."""
    by_spec = _spec_shapes(args)
    return {w.internal: by_spec[w.spec.internal] for w in weight_table(args.n_layers)}


def parameter_count(args) -> int:
    """How many parameters the (unquantized) model ``args`` describes (arithmetic only)."""
    total = 0
    for name, shape in _spec_shapes(args).items():
        total += int(np.prod(shape, dtype=object)) * (args.n_layers if "{i}" in name else 1)
    return total


def meta_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute q/k rows from Meta's interleaved RoPE pairs to the rotate-half order.

    Per head, rows (0, 1), (2, 3), ... are pairs; rotate-half wants the first
    elements of all pairs, then the second ones (transformers' conversion script).
    """
    rows, cols = w.shape
    w = w.reshape(n_heads, rows // n_heads // 2, 2, cols)  # (heads, pairs, 2, cols)
    return w.transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_to_meta_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of ``meta_to_hf_rows``."""
    rows, cols = w.shape
    w = w.reshape(n_heads, 2, rows // n_heads // 2, cols)  # (heads, 2, pairs, cols)
    return w.transpose(0, 2, 1, 3).reshape(rows, cols)


def to_meta_rows(w: np.ndarray, spec: TensorSpec, args) -> np.ndarray:
    """``w`` in Meta's (and llama.cpp's) row order: q/k un-permuted, others as they are."""
    return w if spec.rope_heads is None else hf_to_meta_rows(w, getattr(args, spec.rope_heads))


def from_meta_rows(w: np.ndarray, spec: TensorSpec, args) -> np.ndarray:
    """``w`` from Meta's row order into the internal (rotate-half) one."""
    return w if spec.rope_heads is None else meta_to_hf_rows(w, getattr(args, spec.rope_heads))


def parse_dtype(dtype) -> Optional[mx.Dtype]:
    """``None`` (keep the checkpoint's), an ``mx.Dtype`` or a name such as 'bf16'."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    name = str(dtype).removeprefix("mlx.core.").removeprefix("mx.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise Llama2Error(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cast(a: mx.array, dtype: Optional[mx.Dtype]) -> mx.array:
    """``a`` in ``dtype`` if it is a float array (quantized ints and None stay as they are)."""
    if dtype is None or a.dtype == dtype or not mx.issubdtype(a.dtype, mx.floating):
        return a
    return a.astype(dtype)


PathLike = Union[str, Path]


def check_state_dict(
    weights: Mapping[str, object], expected: Mapping[str, tuple], where: PathLike, *,
    sources: Optional[Mapping[str, PathLike]] = None, what: str = "this model",
    partial: bool = False,
) -> None:
    """Check the names and shapes of loaded ``weights`` against ``expected`` (name -> shape).

    Every problem is one ``Llama2Error`` line naming the file (``sources[name]`` when the
    tensors come from several files, else ``where``) and the tensor. ``partial``: tensors
    of ``expected`` may be absent (adapters over a full parameter set are checked that way
    by their caller). ``what`` says whose parameters ``expected`` are, for the messages.
    """
    sources = sources or {}
    if not partial:
        missing = [name for name in expected if name not in weights]
        if missing:
            more = f" ({len(missing)} missing)" if len(missing) > 1 else ""
            raise Llama2Error(f"{where}: tensor {missing[0]} is missing{more}")
    for name in weights:
        if name not in expected:
            raise Llama2Error(
                f"{sources.get(name, where)}: unexpected tensor {name} (not a parameter of {what})"
            )
    for name, want in expected.items():  # in the model's order: the first layer's first
        a = weights.get(name)
        if a is not None and tuple(a.shape) != tuple(want):
            raise Llama2Error(
                f"{sources.get(name, where)}: tensor {name} has shape {tuple(a.shape)}, the "
                f"model expects {tuple(want)}"
            )


_MX_NAMES = {mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32", mx.uint32: "U32"}
FLOAT_DTYPES = ("F16", "BF16", "F32")


def check_dtypes(weights: Mapping[str, object], where: PathLike, *,
                 sources: Optional[Mapping[str, PathLike]] = None) -> None:
    """Every weight must be float16, bfloat16 or float32, except the packed matrices of
    quantized layers (``<layer>.weight`` beside ``<layer>.scales``): uint32. ``weights``
    may be arrays or declared tensors (a safetensors dtype name, or an MLX dtype)."""
    sources = sources or {}
    for name, t in weights.items():
        dtype = t.dtype if isinstance(t.dtype, str) else _MX_NAMES.get(t.dtype, str(t.dtype))
        packed = name.endswith(".weight") and name[: -len("weight")] + "scales" in weights
        allowed = ("U32",) if packed else FLOAT_DTYPES
        if dtype not in allowed:
            raise Llama2Error(
                f"{sources.get(name, where)}: tensor {name} is {dtype}, not "
                f"{' or '.join(allowed)}"
            )


def parameter_shapes(module, trainable: bool = False) -> dict[str, tuple]:
    """Name -> shape of every parameter (or trainable parameter) of an ``nn.Module``."""
    from mlx.utils import tree_flatten

    params = module.trainable_parameters() if trainable else module.parameters()
    return {k: tuple(v.shape) for k, v in tree_flatten(params)}
