"""Atomic file writes and resumable training checkpoints.

A checkpoint is a folder ``<root>/step_0000040/`` holding the trainable
parameters (``params.safetensors``), the optimizer state
(``optimizer.safetensors``) and ``state.json`` (step, data position, seed and
the run's settings). Folders are written under a temporary name and renamed,
so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from llama2_mlx.errors import Llama2Error

PARAMS_FILE = "params.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


@contextmanager
def atomic_file(path, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file name beside ``path`` for the block to write; renamed onto ``path``
    when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """A temporary folder beside ``path`` for the block to fill; it replaces ``path`` when
    the block succeeds (an existing folder is renamed aside first, so a complete one is
    always there) and is removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors_atomic(path, arrays: dict[str, mx.array], metadata: Optional[dict] = None):
    """Write ``arrays`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, ".safetensors") as tmp:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})


def write_json_atomic(path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_jsonl_atomic(path, records: Iterable[dict]) -> Path:
    """Write records as JSONL (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def save_checkpoint(
    root, step: int, params: dict[str, mx.array], optimizer_state, state: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and drop all but the newest ``keep``."""
    root = Path(root)
    final = _step_dir(root, step)
    with atomic_dir(final) as tmp:
        mx.save_safetensors(str(tmp / PARAMS_FILE), dict(params))
        opt = {k: v for k, v in tree_flatten(optimizer_state) if isinstance(v, mx.array)}
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), opt)
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({**state, "step": step}, f, indent=2)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(root) -> tuple[Path, dict[str, mx.array], dict, dict]:
    """The newest checkpoint under ``root``: (folder, params, flat optimizer state, state)."""
    found = list_checkpoints(root)
    if not found:
        raise Llama2Error(f"--resume: no checkpoint found in {root}")
    path = found[-1]
    try:
        params = mx.load(str(path / PARAMS_FILE))
        opt = mx.load(str(path / OPTIMIZER_FILE))
        with open(path / STATE_FILE) as f:
            state = json.load(f)
    except (OSError, ValueError, RuntimeError) as e:
        raise Llama2Error(f"{path}: unreadable checkpoint ({e})") from None
    return path, params, opt, state
