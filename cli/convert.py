"""``llama2 convert``: a Meta or HF checkpoint to this project's format, optionally quantized."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import DType, add_command, cli_errors, dtype_name, eprint
from llama2_mlx.checkpoints.export import Q_BITS, Q_GROUP_SIZES


def _choices(values) -> str:
    *head, last = map(str, values)
    return f"{', '.join(head)} or {last}"


SrcOpt = Annotated[str, typer.Option("--model", "-m", help="Meta or HF folder, or a hub repo id.")]
OutOpt = Annotated[str, typer.Option("--out", "-o", help="Output folder (replaced atomically).")]
DTypeOpt = Annotated[Optional[DType], typer.Option(help="Cast the weights (default: keep them).")]
QOpt = Annotated[bool, typer.Option("--quantize", "-q", help="Quantize Linear/Embedding layers.")]
BitsOpt = Annotated[int, typer.Option(help=f"Bits per weight when quantizing ({_choices(Q_BITS)}).")]
GroupOpt = Annotated[int, typer.Option(help=f"Quantization group size ({_choices(Q_GROUP_SIZES)}).")]


@cli_errors
def convert(model: SrcOpt, out: OutOpt, dtype: DTypeOpt = None, quantize: QOpt = False,
            q_bits: BitsOpt = 4, q_group_size: GroupOpt = 64) -> None:
    """Convert a checkpoint to this project's (mlx-lm compatible) format."""
    from llama2_mlx.checkpoints.export import convert as convert_checkpoint

    path = convert_checkpoint(model, out, dtype=dtype_name(dtype),
                              q_bits=q_bits if quantize else None, q_group_size=q_group_size)
    eprint(f"converted model written to {Path(path).resolve()}")


def register(app: typer.Typer) -> None:
    add_command(app, "convert", convert)
