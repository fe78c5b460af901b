"""``llama2 plot``: draw a training run's curves from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import add_command, cli_errors, eprint


@cli_errors
def plot(
    run_dir: Annotated[str, typer.Argument(
        metavar="RUN_DIR", help="Output folder of lora-train, reward-train or rs-loop (or its metrics.jsonl).")],
    out: Annotated[Optional[str], typer.Option(
        "--out", "-o", help="Image to write (png, svg or pdf; default: RUN_DIR/loss.png).")] = None,
) -> None:
    """Draw the training and validation curves of a run (needs matplotlib, the plot extra)."""
    from llama2_mlx.training.plot import plot_run

    eprint(f"plot written to {Path(plot_run(run_dir, out)).resolve()}")


def register(app: typer.Typer) -> None:
    add_command(app, "plot", plot)
