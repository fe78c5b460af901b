"""Resumable training checkpoints.

A checkpoint is a folder ``<root>/step_0000040/`` holding the trainable
parameters (``params.safetensors``), the optimizer state
(``optimizer.safetensors``) and ``state.json`` (step, data position, seed and
the run's settings). Folders are written under a temporary name and renamed,
so a crash never leaves a half-written checkpoint behind (``io.atomic``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from llama2_mlx.errors import Llama2Error, OptionError
from llama2_mlx.io.atomic import atomic_dir

PARAMS_FILE = "params.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


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
        raise OptionError("{resume}: no checkpoint found in {root}", root=root)
    path = found[-1]
    try:
        params = mx.load(str(path / PARAMS_FILE))
        opt = mx.load(str(path / OPTIMIZER_FILE))
        with open(path / STATE_FILE) as f:
            state = json.load(f)
    except (OSError, ValueError, RuntimeError) as e:
        raise Llama2Error(f"{path}: unreadable checkpoint ({e})") from None
    return path, params, opt, state
