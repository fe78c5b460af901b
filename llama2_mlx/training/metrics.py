"""``metrics.jsonl``: a run's metrics, one JSON record a line, in its output folder.

Each record has a ``kind`` ("train": a step's loss, learning rate, tokens/s and peak
memory; "val": held-out loss, and accuracy for reward models; others for other loops,
e.g. rs-loop's "iteration") and a ``step``. ``MetricsLog`` appends them, a line at a
time (flushed, so a log being written can be read, e.g. by ``llama2 plot``); a resumed
run first drops what its earlier run wrote after the step it resumes from, so no record
is there twice.

The trainer calls one ``MetricsLog`` object (``trainer.train(metrics=...)``); a caller
that must not write (e.g. all but one process of a data-parallel run) passes None.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from llama2_mlx.io.atomic import append_line, write_jsonl_atomic

METRICS_FILE = "metrics.jsonl"


def read_metrics(path) -> list[dict]:
    """The records of a metrics file (a line cut short by a crash is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


class MetricsLog:
    """Appends metric records to ``path``; ``extra`` fields go into each record (rs-loop's
    fine-tunes: their ``iteration``) and mark the records that are this log's own."""

    def __init__(self, path, **extra):
        self.path, self.extra = Path(path), extra
        self._seen: Optional[set] = None

    def scoped(self, **extra) -> "MetricsLog":
        """A log of the same file whose records also carry ``extra``."""
        return MetricsLog(self.path, **{**self.extra, **extra})

    def _mine(self, rec: dict) -> bool:
        return all(rec.get(k) == v for k, v in self.extra.items())

    def _key(self, rec: dict) -> tuple:
        return (tuple(rec.get(k) for k in self.extra), rec.get("kind"), rec.get("step"))

    def restart(self, after: int = -1, key: str = "step") -> None:
        """Begin (or continue) this log's part of the file: drop its records whose ``key``
        is above ``after`` (-1, a fresh run: all of them; a resumed run: those past the
        step it resumes from). The other records stay as they are."""
        old = read_metrics(self.path) if self.path.exists() else []
        kept = [r for r in old if not (self._mine(r) and _number(r.get(key)) > after)]
        if kept != old or not self.path.exists():
            write_jsonl_atomic(self.path, kept)
        self._seen = {self._key(r) for r in kept if self._mine(r)}

    def write(self, kind: str, step: int, **values) -> None:
        """Append a record (values that are None are left out); a record of the same kind
        and step as one already there is not written again."""
        if self._seen is None:
            self.restart(after=math.inf)  # keep what is there
        rec = {**self.extra, "kind": kind, "step": step,
               **{k: v for k, v in values.items() if v is not None}}
        key = self._key(rec)
        if key in self._seen:
            return
        self._seen.add(key)
        append_line(self.path, json.dumps(rec))


def _number(value) -> float:
    return value if isinstance(value, (int, float)) else -math.inf
