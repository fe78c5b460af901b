"""``llama2 fuse``: merge LoRA adapters into the base model and export it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import DType, add_command, cli_errors, dtype_name, eprint


class Format(str, Enum):
    mlx = "mlx"
    hf = "hf"
    gguf = "gguf"


@cli_errors
def fuse(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model folder or Hugging Face repo id.")],
    out: Annotated[str, typer.Option(help="Output folder.")],
    adapter_path: Annotated[str, typer.Option(help="Adapter folder (ours or mlx-lm's).")] = "adapters",
    format: Annotated[Format, typer.Option(help="mlx (this project, keeps quantization), hf (transformers / mlx-lm) or gguf (llama.cpp).")] = Format.mlx,
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Write a quantized base unquantized.")] = False,
    requantize: Annotated[bool, typer.Option("--requantize", help="Re-quantize fused layers of a quantized base at its bits (smaller, but most of a small update is lost).")] = False,
    dtype: Annotated[Optional[DType], typer.Option(help="Cast the float weights (gguf: float16 unless float32).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model already in --out (once the new one is written whole).")] = False,
) -> None:
    """Merge W + scale * (lora_a @ lora_b)^T into the base weights and write the model."""
    from llama2_mlx.checkpoints.fuse import fuse as run

    path = run(model, adapter_path, out, fmt=format.value, dequantize=dequantize,
               requantize=requantize, dtype=dtype_name(dtype), overwrite=overwrite, say=eprint)
    eprint(f"fused model written to {Path(path).resolve()}")


def register(app: typer.Typer) -> None:
    add_command(app, "fuse", fuse)
