"""A rich progress bar for long loops (training steps, prompts to sample): a
description, ``completed/total``, any text fields and the time left, with room
for log lines (validation, checkpoints) above it."""

from __future__ import annotations

import re
import sys
from string import Formatter
from typing import Optional, Sequence

import mlx.core as mx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


def log_stderr(message: str) -> None:
    """Print a line to stderr at once (the default ``log`` of the training functions)."""
    print(message, file=sys.stderr, flush=True)


def peak_memory_gb() -> float:
    """Peak memory MLX has allocated so far, in GB."""
    return mx.get_peak_memory() / 1e9


class ProgressBar:
    """Context manager around a rich Progress bar.

    ``columns`` are text templates naming fields, e.g. ``"loss {loss}"`` (each
    field shows "-" until set); ``update(completed, loss="0.25")`` moves the bar
    and sets fields; ``log(line)`` prints a line above it. With
    ``enabled=False`` nothing is shown but ``log`` still prints.
    """

    def __init__(
        self, description: str, total: int, columns: Sequence[str] = (), *, completed: int = 0,
        enabled: bool = True, console: Optional[Console] = None,
    ):
        self.console = console or Console(file=sys.stderr)
        self.description, self.total, self.completed = description, total, completed
        self.columns, self.enabled = list(columns), enabled
        self._progress: Optional[Progress] = None
        self._task = None

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            fields = [name for c in self.columns for _, name, _, _ in Formatter().parse(c) if name]
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                *(TextColumn(re.sub(r"\{(\w+)\}", r"{task.fields[\1]}", c), markup=False)
                  for c in self.columns),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                self.description, total=self.total, completed=self.completed,
                **dict.fromkeys(fields, "-"),
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def update(self, completed: int, **fields: str) -> None:
        """Move to ``completed`` and show the given (already formatted) fields."""
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, **fields)

    def log(self, message: str) -> None:
        """Print a line (above the bar while it is shown)."""
        self.console.print(message, highlight=False, markup=False)
