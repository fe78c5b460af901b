"""Output folders a run claims: a lock against a second run, checked before any work, and
an earlier run's results kept until the new run has something to show.

``claim_output`` is how every command that writes a folder of results starts
(``lora-train``'s adapters, ``reward-train``'s reward model, an ``rs-loop`` run, ``fuse``'s
target):

1. The folder is created (or found) and locked: an exclusive ``fcntl.flock`` on a lock
   file that records the holder (pid, host, start time, command line). A second run on
   the folder is refused with one line naming the holder. The kernel drops the lock when
   its process dies however it dies, so the lock of a dead run is stale at once (the
   file it leaves names it, and the next run says so). A run that ends removes the file
   while still holding the lock; a run that locked the file just removed sees that it
   is no longer at its path and takes the new one.
   Creating the lock file is also the check that the folder can be written, before any
   model is loaded or step taken.
2. An earlier run's results in it (the ``artefacts`` the caller names) are refused unless
   the run continues them (``resume``) or replaces them (``overwrite``). Replaced results
   are moved aside into ``.previous-run/`` and dropped only when the new run ``commit``s
   (its first checkpoint, or its end); if the new run fails before that, they are put
   back, and if it was killed, the next claim of the folder puts them back.

Under ``mlx.launch`` rank 0 alone writes, so rank 0 alone claims; its verdict (or error)
reaches every rank, so no rank starts work that another one refused.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from llama2_mlx.errors import Llama2Error, OptionError, one_line

LOCK_FILE = ".llama2.lock"
ASIDE = ".previous-run"


def shown(path: Path, limit: int = 200) -> str:
    """``path`` for a message: a name too long for a line is abbreviated."""
    s = str(path)
    return s if len(s) <= limit else f"{s[:150]}... ({len(s):,} characters)"


class Claim:
    """A claimed output folder (see ``claim_output``)."""

    def __init__(self, path: Path, aside: Optional[Path], say: Callable[[str], None]):
        self.path, self.aside, self.say = path, aside, say

    @property
    def replacing(self) -> bool:
        """Whether an earlier run's results are set aside, waiting for ``commit``."""
        return self.aside is not None

    def commit(self) -> None:
        """The new run has results of its own: drop the earlier run's (idempotent)."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def rollback(self, artefacts: Sequence[str]) -> None:
        """Put the earlier run's results back, removing the new run's (before ``commit``)."""
        if self.aside is None:
            return
        _restore(self.path, self.aside, artefacts)
        self.aside = None
        self.say(f"kept the earlier run in {shown(self.path)} (the new run failed before "
                 "its first checkpoint)")


def _matches(folder: Path, artefacts: Sequence[str]) -> list[Path]:
    found: dict[str, Path] = {}
    for pattern in artefacts:
        for p in folder.glob(pattern):
            found.setdefault(p.name, p)
    return sorted(found.values())


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _restore(folder: Path, aside: Path, artefacts: Sequence[str]) -> None:
    """Move everything under ``aside`` back into ``folder`` (the new run's artefacts out)."""
    for p in _matches(folder, artefacts):
        _remove(p)
    for p in sorted(aside.iterdir()):
        target = folder / p.name
        if target.exists() or target.is_symlink():
            _remove(target)
        os.rename(p, target)
    aside.rmdir()


class _Lock:
    """An exclusive ``flock`` on ``path``, recording its holder in the file."""

    def __init__(self, path: Path, field: str):
        self.path, self.what, self.fd = path, "{" + field + "}", None

    def _locked_fd(self) -> int:
        """A descriptor of the lock file, locked; the file still at its path (a holder
        removes it as it releases the lock: a file locked after that is not the lock)."""
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise _cannot_write_in(self.what, self.path.parent, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder_text(_read_holder(fd))
                os.close(fd)
                raise OptionError(self.what + ": {path} is in use by another run ({holder}); "
                                  "wait for it to end or choose another folder",
                                  path=shown(self.path.parent), holder=holder) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = False
            if same:
                return fd
            os.close(fd)  # removed by the holder that just ended: lock the new one
        raise OptionError(self.what + ": {path}: cannot take the lock", path=shown(self.path))

    def acquire(self, say: Callable[[str], None]) -> None:
        fd = self._locked_fd()
        stale = _read_holder(fd)
        if stale:  # a holder that ended without clearing the file: killed, or its machine died
            say(f"note: {shown(self.path.parent)} was locked by a run that did not end cleanly "
                f"({_holder_text(stale)}); taking it over")
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(os.path.basename(a) if i == 0 else a
                                      for i, a in enumerate(sys.argv))[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise _cannot_write_in(self.what, self.path.parent, e) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # removed while locked: a run that ended cleanly leaves nothing behind
            os.unlink(self.path)
        except OSError:
            try:
                os.ftruncate(self.fd, 0)  # at least empty: a later holder is not warned
            except OSError:
                pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> Optional[dict]:
    """The holder a lock file records (None: empty, released cleanly)."""
    try:
        data = os.pread(fd, 4096, 0)
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        holder = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"command": "unknown"}


def _holder_text(holder: Optional[dict]) -> str:
    if not holder:
        return "a process that left no details"
    parts = []
    if "pid" in holder:
        parts.append(f"pid {holder['pid']}" + (f" on {holder['host']}" if "host" in holder else ""))
    if "started" in holder:
        parts.append(f"since {holder['started']}")
    if holder.get("command"):
        parts.append(one_line(holder["command"], 120))
    return ", ".join(str(p) for p in parts) or "a process that left no details"


def _cannot_write_in(what: str, folder: Path, e: OSError) -> OptionError:
    return OptionError(what + ": cannot write in {path} ({why})", path=shown(folder),
                       why=e.strerror or one_line(e, 80))


def _check_folder(path: Path, what: str) -> None:
    """Create ``path`` as a folder, or one line saying why it cannot be."""
    try:
        os.stat(path)
        exists = True
    except FileNotFoundError:
        exists = False
    except (OSError, ValueError) as e:
        raise OptionError(what + ": {path}: {why}", path=shown(path),
                          why=getattr(e, "strerror", None) or one_line(e, 80)) from None
    if exists and not os.path.isdir(path):
        raise OptionError(what + ": {path} exists and is not a folder", path=shown(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(what + ": cannot create {path} ({why})", path=shown(path),
                          why=e.strerror or one_line(e, 80)) from None


def check_output_file(path, field: str) -> Path:
    """Check before any work that file ``path`` can be written (its folder is created,
    and a file made and removed there): one line naming option ``field`` if it cannot
    (a folder in the way, a read-only file system, no permission)."""
    path, what = Path(path), "{" + field + "}"
    try:
        if path.is_dir():
            raise OptionError(what + ": {path} is a folder", path=shown(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                            suffix=".probe")
        probe.close()
    except (OSError, ValueError) as e:
        raise OptionError(what + ": cannot write {path} ({why})", path=shown(path),
                          why=getattr(e, "strerror", None) or one_line(e, 80)) from None
    return path


def _claim(path: Path, field: str, artefacts: Sequence[str], results: Sequence[str],
           resume: bool, overwrite: bool, continues: Optional[str], say: Callable[[str], None],
           whole: bool) -> tuple[_Lock, Claim]:
    what = "{" + field + "}"
    _check_folder(path, what)
    lock_path = path.parent / f".{path.name}.lock" if whole else path / LOCK_FILE
    lock = _Lock(lock_path, field)
    lock.acquire(say)
    try:
        aside = path / ASIDE
        if aside.is_dir():
            _restore(path, aside, artefacts)
            say(f"restored the earlier run in {shown(path)}: a run that was replacing it "
                "stopped before its first checkpoint")
        found, held = _matches(path, artefacts), _matches(path, results)
        if not held or resume:
            return lock, Claim(path, None, say)
        names = ", ".join(p.name for p in held[:4]) + (", ..." if len(held) > 4 else "")
        if not overwrite:
            hint = f"{continues} continues it, " if continues else ""
            raise OptionError(what + ": {path} holds an earlier run's results ({names}); "
                              + hint + "{overwrite} replaces it, or choose another folder",
                              path=shown(path), names=names)
        if whole:  # the writer replaces the folder at once when the new one is complete
            return lock, Claim(path, None, say)
        aside.mkdir()
        for p in found:
            os.rename(p, aside / p.name)
        say(f"replacing the earlier run in {shown(path)} (kept until this run's first "
            "checkpoint)")
        return lock, Claim(path, aside, say)
    except BaseException:
        lock.release()
        raise


@contextmanager
def claim_output(
    path, *, field: str, artefacts: Sequence[str], results: Optional[Sequence[str]] = None,
    resume: bool = False,
    overwrite: bool = False, continues: Optional[str] = None,
    say: Callable[[str], None] = lambda s: None, whole: bool = False, world=None,
) -> Iterator[Claim]:
    """Claim folder ``path`` for a run's results (see the module docstring).

    ``field`` is the option that named the folder (errors name it); ``artefacts`` are
    the names or glob patterns of what a run leaves there, ``results`` (default: all of
    them) those that make it a run not to lose (without them the folder is simply
    reused); ``continues`` is the
    option that continues an earlier run (for the refusal's hint), ``resume`` whether
    this run does. ``whole``: the writer replaces the folder whole once the new one is
    complete (``atomic_dir``, as ``fuse`` does), so nothing is set aside and the lock
    file is beside the folder. With a ``world`` of several ranks, rank 0 claims
    and every rank gets its verdict. A failure before ``commit`` puts the earlier
    results back; the lock is released at the end.
    """
    path = Path(path)
    distributed = world is not None and world.size > 1
    lock, claim, error = None, Claim(path, None, say), None
    if not distributed or world.is_main:
        try:
            lock, claim = _claim(path, field, artefacts, artefacts if results is None
                                 else results, resume, overwrite, continues, say, whole)
        except Llama2Error as e:
            error = e
    if distributed:  # rank 0's error on every rank, still naming the option as typed
        verdict = world.broadcast_object(
            None if error is None else {"message": str(error)} if not isinstance(
                error, OptionError) else {"template": error.text.template,
                                          "values": error.text.values},
            "claiming the output folder")
        if verdict is not None and error is None:
            error = (OptionError(verdict["template"], **verdict["values"])
                     if "template" in verdict else Llama2Error(verdict["message"]))
    if error is not None:
        raise error
    try:
        yield claim
        claim.commit()
    except BaseException:
        claim.rollback(artefacts)
        raise
    finally:
        if lock is not None:
            lock.release()
