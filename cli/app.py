"""The ``llama2`` command line: thin Typer commands over the library."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="llama2",
    help="Llama 2 on MLX: generate, chat, LoRA fine-tuning, fuse and a light RLHF loop.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines register(app) and owns its commands.
COMMAND_MODULES = ["cli.generate", "cli.convert", "cli.train", "cli.fuse", "cli.rlhf", "cli.demo",
                   "cli.serve"]
for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
