"""The ``llama2`` command line: thin Typer commands over the library."""

from __future__ import annotations

import importlib

# Before any command module (or anything else) imports mlx: pick the BLAS (llama2_mlx/blas.py).
from llama2_mlx.blas import setup as _setup_blas

_setup_blas()

import typer  # noqa: E402

app = typer.Typer(
    name="llama2",
    help="Llama 2 on MLX: generate, chat, LoRA fine-tuning, fuse and a light RLHF loop.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines register(app) and owns its commands.
COMMAND_MODULES = ["cli.generate", "cli.convert", "cli.train", "cli.fuse", "cli.rlhf", "cli.demo",
                   "cli.plot", "cli.env"]
for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def _version(value: bool) -> None:
    if value:
        from llama2_mlx.blas import environment

        info = environment()
        typer.echo(f"llama2-mlx {info['llama2-mlx']} (mlx {info['mlx']}, BLAS: {info['BLAS']})")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Show the version, mlx's and the BLAS in use, and exit."),
) -> None:
    pass


def main() -> None:
    app()
