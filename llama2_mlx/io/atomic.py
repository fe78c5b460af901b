"""Atomic writes: a file or folder appears whole or not at all.

Everything the project writes (models, adapters, checkpoints, JSON and JSONL results)
goes through these helpers: the data is written under a temporary name beside the
target and renamed onto it, so a crash or a full disk never leaves a half-written file.
"""

from __future__ import annotations

import errno
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


def _cannot_write(path: Path, e: Exception) -> Llama2Error:
    s = str(path)
    shown = s if len(s) <= 200 else f"{s[:150]}... ({len(s):,} characters)"
    return Llama2Error(f"{shown}: cannot write ({getattr(e, 'strerror', None) or one_line(e, 80)})")


# Errors of writing, not of the data being written: they become one line naming the file.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _write_failure(path: Path, e: BaseException) -> Optional[Llama2Error]:
    """The one-line error for ``e`` raised while writing ``path``, if it is a write failure:
    an ``OSError`` of a full disk / read-only file system, or MLX's ``RuntimeError`` of a
    failed write (``[write] Unable to write N bytes``, which names no file)."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return _cannot_write(path, e)
    if isinstance(e, RuntimeError) and str(e).startswith(("[write]", "[save", "[save_safetensors]")):
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        why = ("no space left on device" if free is not None and free < (1 << 20)
               else one_line(e, 80))
        return Llama2Error(f"{_cannot_write(path, OSError(0, why))}")
    return None


def _temporary(path: Path, suffix: str = ".tmp") -> str:
    """A new empty file beside ``path`` (the umask's permissions), for writing it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
    except OSError as e:
        raise _cannot_write(path, e) from None
    os.close(fd)
    return tmp


@contextmanager
def atomic_file(path, suffix: Optional[str] = None) -> Iterator[str]:
    """A temporary file name beside ``path`` for the block to write; renamed onto ``path``
    when the block succeeds, removed when it fails (a full disk or read-only file system
    then is one ``Llama2Error`` line naming ``path``)."""
    with atomic_files(path, suffix=suffix) as (tmp,):
        yield tmp


@contextmanager
def atomic_files(*paths, suffix: Optional[str] = None) -> Iterator[list[str]]:
    """Temporary names beside several ``paths`` for the block to write; all are renamed
    onto theirs (in the order given) when the block succeeds, none when it fails: files
    that belong together (an adapter's config and weights) land together or not at all.
    (Renaming needs no space: a full disk fails the block, before any rename.) A temporary
    ends like its target (``.tmp.safetensors``: MLX adds the extension to a name without
    it), or with ``suffix``."""
    targets = [Path(p) for p in paths]
    tmps: list[str] = []
    try:
        for p in targets:
            tmps.append(_temporary(p, suffix or f".tmp{p.suffix}"))
        yield tmps
        for tmp, p in zip(tmps, targets):
            os.replace(tmp, p)
    except BaseException as e:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        failure = _write_failure(targets[0] if len(targets) == 1 else targets[0].parent, e)
        if failure is not None:
            raise failure from None
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _write_failure(path, e)
        if failure is not None:
            raise failure from None
        raise


def check_finite(arrays: dict[str, mx.array], path) -> None:
    """Refuse to write weights holding NaN or infinities (a diverged run, a float16
    overflow): one line naming the file and the first such tensor."""
    for name, a in arrays.items():
        if mx.issubdtype(a.dtype, mx.inexact) and not mx.all(mx.isfinite(a)).item():
            raise Llama2Error(f"{path}: not written: {name} holds NaN or infinite values")


def save_weights(path, arrays: dict[str, mx.array], metadata: Optional[dict] = None) -> None:
    """``mx.save_safetensors`` of weights known finite (``check_finite``), its failure
    one line naming ``path`` (no atomicity: write into an ``atomic_*`` temporary)."""
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"save_weights: {path} does not end with .safetensors")
    check_finite(arrays, path)
    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    except RuntimeError as e:
        failure = _write_failure(Path(path), e)
        raise (failure or e) from None


def save_safetensors_atomic(path, arrays: dict[str, mx.array], metadata: Optional[dict] = None):
    """Write finite ``arrays`` to ``path`` atomically (``atomic_file`` + ``save_weights``)."""
    with atomic_file(path, ".safetensors") as tmp:
        save_weights(tmp, arrays, metadata)


def append_line(path, line: str) -> None:
    """Append ``line`` and a newline to a log file (UTF-8), flushed; a full disk or a
    read-only file system is one ``Llama2Error`` line naming ``path``."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
    except OSError as e:
        raise _cannot_write(Path(path), e) from None


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
