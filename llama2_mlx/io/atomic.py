"""Atomic writes: a file or folder appears whole or not at all.

Everything the project writes (models, adapters, checkpoints, JSON and JSONL results)
goes through these helpers: the data is written under a temporary name beside the
target and renamed onto it, so a crash or a full disk never leaves a half-written file.
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

from llama2_mlx.errors import Llama2Error, one_line


# The process's umask, read once (reading it means setting it): mkstemp and mkdtemp make
# private files (0600) and folders (0700); what we write gets the permissions any other
# tool's files get, 0666 / 0777 less the umask.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _cannot_write(path: Path, e: OSError) -> Llama2Error:
    s = str(path)
    shown = s if len(s) <= 200 else f"{s[:150]}... ({len(s):,} characters)"
    return Llama2Error(f"{shown}: cannot write ({e.strerror or one_line(e, 80)})")


@contextmanager
def atomic_file(path, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file name beside ``path`` for the block to write; renamed onto ``path``
    when the block succeeds, removed when it fails."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
    except OSError as e:
        raise _cannot_write(path, e) from None
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
    except OSError as e:
        raise _cannot_write(path, e) from None
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
