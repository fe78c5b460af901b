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
COMMAND_MODULES = ["cli.generate", "cli.convert", "cli.train", "cli.fuse", "cli.rlhf", "cli.ppo", "cli.gatt", "cli.demo",
                   "cli.env", "cli.eval", "cli.serve", "cli.plot"]
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


# The commands that run on several processes (docs/distributed.md); under mlx.launch the
# others would each do the whole job and write the same files, so they are refused.
DISTRIBUTED = ("lora-train", "reward-train", "rejection-sample", "rs-loop", "generate", "chat")


def main() -> None:
    from llama2_mlx.io.distributed import launched_backend

    if launched_backend() is not None:  # started by mlx.launch: join the other ranks first
        _start_distributed()
    app()


def _start_distributed() -> None:
    import os
    import sys

    from llama2_mlx.errors import Llama2Error
    from llama2_mlx.io.distributed import EXIT_STATUS, DistributedError, start

    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    try:
        if command is not None and command not in DISTRIBUTED:
            rank = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "0"
            if rank != "0":  # every rank refuses alike: rank 0 says so
                raise SystemExit(2)
            raise Llama2Error(f"llama2 {command} does not run on several processes (those that "
                              f"do: {', '.join(DISTRIBUTED)}); run it without mlx.launch")
        start()
    except Llama2Error as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS if isinstance(e, DistributedError) else 2) from None


if __name__ == "__main__":  # python -m cli.app (the hostile-input and distributed tests run it so)
    main()
