"""A rich progress bar for training loops: step, loss, learning rate, tokens/s and
peak memory, with room for log lines (validation, checkpoints) above it."""

from __future__ import annotations

import sys
from typing import Optional

import mlx.core as mx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def peak_memory_gb() -> float:
    """Peak memory MLX has allocated so far, in GB."""
    return mx.get_peak_memory() / 1e9


class TrainProgress:
    """Context manager around a rich Progress bar.

    ``update(step, loss=..., lr=..., tokens_per_sec=...)`` moves the bar to
    ``step`` and refreshes the fields; ``log(line)`` prints a line above it.
    With ``enabled=False`` nothing is shown but ``log`` still prints.
    """

    def __init__(
        self, total_steps: int, *, description: str = "train", start_step: int = 0,
        enabled: bool = True, console: Optional[Console] = None,
    ):
        self.console = console or Console(file=sys.stderr)
        self.enabled = enabled
        self.total, self.start = total_steps, start_step
        self._progress: Optional[Progress] = None
        self._task = None
        self.description = description

    def __enter__(self) -> "TrainProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("peak {task.fields[mem]} GB"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                self.description, total=self.total, completed=self.start,
                loss="-", lr="-", tps="-", mem="-",
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def update(
        self, step: int, *, loss: Optional[float] = None, lr: Optional[float] = None,
        tokens_per_sec: Optional[float] = None, peak_memory: Optional[float] = None,
    ) -> None:
        """Move to ``step`` (completed optimizer steps) and show the given numbers."""
        if self._progress is None:
            return
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if lr is not None:
            fields["lr"] = f"{lr:.2e}"
        if tokens_per_sec is not None:
            fields["tps"] = f"{tokens_per_sec:,.0f}"
        fields["mem"] = f"{peak_memory if peak_memory is not None else peak_memory_gb():.2f}"
        self._progress.update(self._task, completed=step, **fields)

    def log(self, message: str) -> None:
        """Print a line (above the bar while it is shown)."""
        self.console.print(message, highlight=False, markup=False)
