"""Resumable training checkpoints.

A checkpoint is a folder ``<root>/step_0000040/`` holding the trainable
parameters (``params.safetensors``), the optimizer state
(``optimizer.safetensors``) and ``state.json`` (step, data position, seed and
the run's settings). Folders are written under a temporary name and renamed,
so a crash never leaves a half-written checkpoint behind (``io.atomic``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from llama2_mlx.errors import Llama2Error, OptionError, one_line
from llama2_mlx.formats.safetensors import read_safetensors
from llama2_mlx.io.atomic import atomic_dir, save_weights
from llama2_mlx.io.readers import file_size, read_json

PARAMS_FILE = "params.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def json_digest(x) -> str:
    """A short digest of JSON data, for a run's settings (its prompts) to be compared on
    resume without storing them."""
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def save_checkpoint(
    root, step: int, params: dict[str, mx.array], optimizer_state, state: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and drop all but the newest ``keep``."""
    root = Path(root)
    final = _step_dir(root, step)
    with atomic_dir(final) as tmp:
        save_weights(tmp / PARAMS_FILE, dict(params))
        opt = {k: v for k, v in tree_flatten(optimizer_state) if isinstance(v, mx.array)}
        save_weights(tmp / OPTIMIZER_FILE, opt)
        # The sizes written, so that a file cut short later is known at resume.
        files = {n: (tmp / n).stat().st_size for n in (PARAMS_FILE, OPTIMIZER_FILE)}
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({**state, "step": step, "files": files}, f, indent=2)
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


def load_checkpoint(root, say: Callable[[str], None] = lambda s: None
                    ) -> tuple[Path, dict[str, mx.array], dict, dict]:
    """The newest intact checkpoint under ``root``: (folder, params, flat optimizer state,
    state). A damaged one (a file missing, truncated or of another size than written,
    an unreadable header, a ``state.json`` without what resuming needs) is passed over
    for the one before it, and ``say`` tells which and why."""
    found = list_checkpoints(root)
    if not found:
        raise OptionError("{resume}: no checkpoint found in {root}", root=root)
    damaged: list[str] = []
    for path in reversed(found):
        try:
            loaded = _read_checkpoint(path)
        except Llama2Error as e:
            damaged.append(f"{path.name}: {one_line(e, 200)}")
            say(f"checkpoint {path} is damaged ({one_line(e, 200)}); trying the one before it")
            continue
        if damaged:
            say(f"resuming from {path}, the newest intact checkpoint")
        return loaded
    raise OptionError("{resume}: no intact checkpoint in {root} ({why})", root=root,
                      why="; ".join(damaged[:2]))


def _read_checkpoint(path: Path) -> tuple[Path, dict[str, mx.array], dict, dict]:
    # Checked readers: the header of each file before its bytes, regular files only.
    state = read_json(path / STATE_FILE)
    _check_state(state, path / STATE_FILE)
    for name, size in state.get("files", {}).items():
        if name not in (PARAMS_FILE, OPTIMIZER_FILE):
            raise Llama2Error(f"{path / STATE_FILE}: files names {name!r}, not a checkpoint file")
        got = file_size(path / name)
        if got != size:
            raise Llama2Error(f"{path / name}: {got if got is not None else 'no'} bytes, "
                              f"{size} were written")
    params = read_safetensors(path / PARAMS_FILE)
    opt = read_safetensors(path / OPTIMIZER_FILE)
    return path, params, opt, state


def _check_state(state: dict, where: Path) -> None:
    """The shape of ``state.json`` that resuming relies on."""
    if not isinstance(state, dict):
        raise Llama2Error(f"{where}: not a JSON object")
    step = state.get("step")
    if type(step) is not int or step < 0:
        raise Llama2Error(f"{where}: step = {one_line(repr(step), 40)} is not a step number")
    if not isinstance(state.get("fingerprint"), dict):
        raise Llama2Error(f"{where}: no fingerprint of the run's settings")
    for key in ("train_losses", "learning_rates", "val_losses"):
        value = state.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(x, list) and len(x) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)
            for x in value
        ):
            raise Llama2Error(f"{where}: {key} is not a list of [step, value] pairs")
    files = state.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in files.values()):
        raise Llama2Error(f"{where}: files is not an object of file sizes")
