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

from llama2_mlx.errors import Llama2Error, OptionError, one_line
from llama2_mlx.formats.safetensors import read_safetensors
from llama2_mlx.io.atomic import atomic_dir
from llama2_mlx.io.readers import read_json

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
    # Checked readers: the header of each file before its bytes, regular files only.
    params = read_safetensors(path / PARAMS_FILE)
    opt = read_safetensors(path / OPTIMIZER_FILE)
    state = read_json(path / STATE_FILE)
    _check_state(state, path / STATE_FILE)
    return path, params, opt, state


def _check_state(state: dict, where: Path) -> None:
    """The shape of ``state.json`` that resuming relies on."""
    step = state.get("step")
    if type(step) is not int or step < 0:
        raise Llama2Error(f"{where}: step = {one_line(repr(step), 40)} is not a step number")
    if not isinstance(state.get("fingerprint"), dict):
        raise Llama2Error(f"{where}: no fingerprint of the run's settings")
    for key in ("train_losses", "learning_rates", "val_losses"):
        value = state.get(key, [])
        if not isinstance(value, list) or not all(isinstance(x, list) for x in value):
            raise Llama2Error(f"{where}: {key} is not a list of [step, value] pairs")
