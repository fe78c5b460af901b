"""``llama2 env``: versions, the default device and the BLAS that MLX's CPU matmuls use."""

from __future__ import annotations

import typer

from cli.common import add_command


def env() -> None:
    """Print llama2-mlx, Python and mlx versions, the default device and the BLAS in use."""
    from llama2_mlx.blas import environment

    for key, value in environment().items():
        typer.echo(f"{key + ':':<12}{value}")


def register(app: typer.Typer) -> None:
    add_command(app, "env", env)
