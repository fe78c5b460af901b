"""Shared CLI plumbing: one-line errors instead of tracebacks, the dtype choice and
options grouped in help panels."""

from __future__ import annotations

import functools
import sys
from enum import Enum
from typing import Optional

import typer

from llama2_mlx.errors import Llama2Error

DATA, LORA, TRAINING = "Data", "LoRA", "Training"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def dtype_name(dtype: Optional[DType]) -> Optional[str]:
    """The library's dtype argument for a ``--dtype`` choice (None: keep the checkpoint's)."""
    return dtype.value if dtype else None


def opt(help: str, panel: str = TRAINING, *names: str):
    """A ``typer.Option`` shown in help panel ``panel``."""
    return typer.Option(*names, help=help, rich_help_panel=panel)


def cli_errors(fn):
    """Turn library errors into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Llama2Error as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def eprint(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)
