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

    When the console is not a terminal (stderr sent to a log file) there is no bar:
    every ``every`` steps (and at the last) one line says where the loop is, with
    its fields (``lora-train 10/100: loss 1.2345, lr 1.00e-03, ...``). ``every``
    defaults to a tenth of the total (0: no lines).
    """

    def __init__(
        self, description: str, total: int, columns: Sequence[str] = (), *, completed: int = 0,
        enabled: bool = True, console: Optional[Console] = None, every: Optional[int] = None,
    ):
        self.console = console or Console(file=sys.stderr)
        self.description, self.total, self.completed = description, total, completed
        self.columns, self.enabled = list(columns), enabled
        self.every = every if every is not None else max(1, total // 10)
        self.bar = enabled and self.console.is_terminal
        self.lines = enabled and not self.console.is_terminal and self.every > 0
        self._fields = [name for c in self.columns for _, name, _, _ in Formatter().parse(c) if name]
        self._progress: Optional[Progress] = None
        self._task = None

    def __enter__(self) -> "ProgressBar":
        if self.bar:
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
                **dict.fromkeys(self._fields, "-"),
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
        elif self.lines and (completed % self.every == 0 or completed == self.total):
            values = {**dict.fromkeys(self._fields, "-"), **fields}
            shown = ", ".join(c.format(**values) for c in self.columns)
            self.log(f"{self.description} {completed}/{self.total}" + (f": {shown}" if shown else ""))
        self.completed = completed

    def log(self, message: str) -> None:
        """Print a line (above the bar while it is shown)."""
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)
