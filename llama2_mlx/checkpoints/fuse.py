"""``llama2 fuse``: merge LoRA adapters into the base weights and export the model.

Formats: ``mlx`` (this project's folder, quantized if the base is), ``hf``
(Hugging Face folder: config.json, model.safetensors, tokenizer; loads in
transformers and mlx-lm) and ``gguf`` (one llama.cpp file, f16 or f32, with
llama.cpp's tensor names, q/k rows in Meta's interleaved RoPE order and the
SentencePiece vocabulary).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import mlx.nn as nn
from mlx.utils import tree_map

from llama2_mlx.checkpoints.export import save_model
from llama2_mlx.checkpoints.load import load
from llama2_mlx.errors import OptionError
from llama2_mlx.formats.gguf import read_gguf, write_gguf
from llama2_mlx.formats.weights import DTYPES, cast
from llama2_mlx.io.outdir import claim_output
from llama2_mlx.io.readers import exists
from llama2_mlx.models.lora import fuse_lora, lora_layers
from llama2_mlx.models.model import ModelArgs, Transformer

FORMATS = ("mlx", "hf", "gguf")


def read_gguf_model(path) -> Transformer:
    """A ``Transformer`` from a GGUF file written by ``write_gguf`` (for checks)."""
    fields, weights = read_gguf(path)
    model = Transformer(ModelArgs(**fields))
    model.load_weights(list(weights.items()))
    return model


def fuse_model(model: nn.Module, *, dequantize: bool = False, requantize: bool = False) -> nn.Module:
    """Merge the LoRA layers of ``model`` into its weights (see ``lora.fuse_lora``)."""
    if not lora_layers(model):
        raise OptionError("fuse: the model has no LoRA layers (check {adapter_path})")
    return fuse_lora(model, dequantize=dequantize, requantize=requantize)


def fuse(
    model_path, adapter_path, out, *, fmt: str = "mlx", dequantize: bool = False,
    requantize: bool = False, dtype: Optional[str] = None, overwrite: bool = False,
    say: Callable[[str], None] = lambda s: None,
) -> Path:
    """Load ``model_path`` with the adapters of ``adapter_path``, fuse them and write the
    result to folder ``out`` in format ``fmt`` (mlx, hf or gguf). Returns the written path.

    hf and gguf are always dequantized; ``dtype`` (float32, float16, bfloat16) casts the
    float weights (gguf: float16 unless float32). ``out`` is claimed first (locked,
    writable); a model already there is replaced only with ``overwrite``, and only once the
    new one is written whole.
    """
    if fmt not in FORMATS:
        raise OptionError("{format} must be one of {choices} (got {fmt!r})",
                          choices=', '.join(FORMATS), fmt=fmt)
    if dtype is not None and dtype not in DTYPES:
        raise OptionError("{dtype} must be one of {choices} (got {got!r})",
                          choices=', '.join(DTYPES), got=dtype)
    if fmt == "gguf" and dtype == "bfloat16":
        raise OptionError("{dtype} bfloat16 is not written to gguf; use float16 or float32")
    out = Path(out)
    if exists(model_path) and exists(out) and os.path.samefile(model_path, out):
        raise OptionError("{out} {path} is the base model's folder: choose another one",
                          path=str(out))
    with claim_output(out, field="out", artefacts=FUSED_ARTEFACTS, overwrite=overwrite,
                      say=say, whole=True):
        return _fuse(model_path, adapter_path, out, fmt, dequantize, requantize, dtype)


# What a model folder holds (a model there is replaced only with --overwrite).
FUSED_ARTEFACTS = ("config.json", "*.safetensors", "*.gguf", "model.safetensors.index.json",
                   "tokenizer.model", "params.json", "*.pth")


def _fuse(model_path, adapter_path, out: Path, fmt, dequantize, requantize, dtype) -> Path:
    model, tokenizer = load(model_path, adapter_path=adapter_path)
    fuse_model(model, dequantize=dequantize or fmt != "mlx", requantize=requantize)
    if fmt == "gguf":
        name = "f32" if dtype == "float32" else "f16"
        return write_gguf(model, out / f"model-{name}.gguf", tokenizer.model_path, name)
    if dtype is not None:
        model.update(tree_map(lambda a: cast(a, DTYPES[dtype]), model.parameters()))
    return save_model(model, out, tokenizer.model_path)
