"""``llama2 convert``: a Meta or HF checkpoint to this project's format, optionally quantized."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import DType, cli_errors, dtype_name

SrcOpt = Annotated[str, typer.Option("--model", "-m", help="Meta or HF folder, or a hub repo id.")]
OutOpt = Annotated[str, typer.Option("--out", "-o", help="Output folder (replaced atomically).")]
DTypeOpt = Annotated[Optional[DType], typer.Option(help="Cast the weights (default: keep them).")]
QOpt = Annotated[bool, typer.Option("--quantize", "-q", help="Quantize Linear/Embedding layers.")]
BitsOpt = Annotated[int, typer.Option(help="Bits per weight when quantizing (4 or 8).")]
GroupOpt = Annotated[int, typer.Option(help="Quantization group size (32, 64 or 128).")]


@cli_errors
def convert(model: SrcOpt, out: OutOpt, dtype: DTypeOpt = None, quantize: QOpt = False,
            q_bits: BitsOpt = 4, q_group_size: GroupOpt = 64) -> None:
    """Convert a checkpoint to this project's (mlx-lm compatible) format."""
    from llama2_mlx.checkpoints.export import convert as convert_checkpoint

    path = convert_checkpoint(model, out, dtype=dtype_name(dtype),
                              q_bits=q_bits if quantize else None, q_group_size=q_group_size)
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
