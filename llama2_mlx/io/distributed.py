"""Several processes as one run: a thin layer over MLX's own distributed engine,
``mx.distributed`` (ring over TCP / Thunderbolt, MPI, JACCL, NCCL), started by ``mlx.launch``.

``world()`` is this process's ``World``: its rank and size (rank 0 of 1 without
``mlx.launch``, where nothing here talks to anything), the collectives the project uses
(``all_sum`` of arrays or trees of arrays, ``all_gather_objects``, ``broadcast_object``,
``broadcast``, ``barrier``) and ``main_only`` for what rank 0 alone does (files, logs).

Every collective runs under a watchdog: a rank whose peers do not answer within
``LLAMA2_DIST_TIMEOUT`` seconds (default 300; a dead, hung or unreachable peer; the ring
backend would otherwise wait forever; ``LLAMA2_DIST_START_TIMEOUT`` bounds the wait for
the peers to start) stops with one ``error:`` line and exit status 3,
and so does a rank that ``mlx.launch`` terminates (SIGTERM) because another rank failed.
A peer whose connection drops (it died) raises ``DistributedError`` at once; under
``start()`` (the command line) that too is one line and exit status 3. Checkpoints are
written atomically by rank 0, so the last complete one survives any of these.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from llama2_mlx.errors import Llama2Error, one_line

TIMEOUT_ENV = "LLAMA2_DIST_TIMEOUT"
START_TIMEOUT_ENV = "LLAMA2_DIST_START_TIMEOUT"  # waiting for the peers to start (default: 300)
DEFAULT_TIMEOUT = 300.0
EXIT_STATUS = 3  # a distributed failure (a bad input is 2)
BUCKET_BYTES = 32 * 1024**2  # arrays summed in one collective, at most (about)


class DistributedError(Llama2Error):
    """The other ranks of a distributed run cannot be reached (died, hung, unreachable)."""


def launched_backend(env=None) -> Optional[str]:
    """The ``mx.distributed`` backend ``mlx.launch`` (or mpirun) set this process up for,
    from its environment; None for a single process (``mlx.launch -n 1`` included)."""
    env = os.environ if env is None else env
    if env.get("MLX_WORLD_SIZE") and int(env["MLX_WORLD_SIZE"]) > 1:
        return "nccl"
    if env.get("MLX_JACCL_COORDINATOR"):
        return "jaccl"
    hostfile = env.get("MLX_HOSTFILE")
    if hostfile and env.get("MLX_RANK") is not None:
        try:
            with open(hostfile) as f:
                hosts = f.read().strip()
        except OSError:
            raise Llama2Error(f"MLX_HOSTFILE {hostfile}: cannot be read") from None
        return "ring" if hosts else None
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if env.get(name) and int(env[name]) > 1:
            return "mpi"
    return None


def timeout_seconds(env=None, name: str = TIMEOUT_ENV) -> float:
    """The time limit in the environment variable ``name`` (default ``DEFAULT_TIMEOUT``)."""
    env = os.environ if env is None else env
    raw = env.get(name)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise Llama2Error(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise Llama2Error(f"{name} must be positive (got {raw})")
    return value


class _Watchdog:
    """A daemon thread that ends the process with one line when a collective outlives its
    deadline, or when SIGTERM arrives (read from the signal wake-up fd, so it works while
    the main thread is blocked inside a collective)."""

    def __init__(self, label: str):
        self.label = label
        self.note: Optional[str] = None  # appended to the error line (e.g. the last checkpoint)
        self._guards: list[tuple[float, float, str]] = []  # (deadline, timeout, what)
        self._lock = threading.Lock()
        self._dying = threading.Lock()
        self._wake_r: Optional[int] = None
        self._thread = threading.Thread(target=self._run, name="llama2-distributed-watchdog",
                                         daemon=True)
        self._thread.start()

    def catch_sigterm(self) -> None:
        """Stop with one line on SIGTERM (how ``mlx.launch`` ends the others when a rank
        fails). Only from the main thread (a Python rule for signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.signal(signal.SIGTERM, lambda *_: self.die(self._sigterm_message()))
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._wake_r = r

    @staticmethod
    def _sigterm_message() -> str:
        return "stopped (SIGTERM): another rank failed or the run was cancelled"

    @contextmanager
    def guard(self, what: str, timeout: float) -> Iterator[None]:
        with self._lock:
            self._guards.append((time.monotonic() + timeout, timeout, what))
        try:
            yield
        finally:
            with self._lock:
                self._guards.pop()

    def die(self, message: str) -> None:
        """Write ``error: <label>: message`` to fd 2 and end the process at once (no
        cleanup that could wait on a dead peer). Only the first caller writes."""
        if not self._dying.acquire(blocking=False):
            while True:  # another thread is ending the process
                time.sleep(1)
        note = f"; {self.note}" if self.note else ""
        line = f"error: {self.label}: {message}{note}\n"
        try:  # straight to fd 2: a lock held by the stuck main thread cannot block it
            os.write(2, line.encode())
        finally:
            os._exit(EXIT_STATUS)

    def _run(self) -> None:
        while True:
            try:
                self._check()
            except Exception:  # never let the watchdog die (it would leave hangs unbounded)
                time.sleep(0.2)

    def _check(self) -> None:
        """One look: SIGTERM arrived, or a collective is past its deadline."""
        import select

        if self._wake_r is not None:
            if select.select([self._wake_r], [], [], 0.2)[0]:
                try:
                    data = os.read(self._wake_r, 64)
                except BlockingIOError:
                    data = b""
                if signal.SIGTERM in data:
                    self.die(self._sigterm_message())
        else:
            time.sleep(0.2)
        with self._lock:
            late = [g for g in self._guards if time.monotonic() > g[0]]
        if late:
            _, timeout, what = late[0]
            self.die(f"{what}: no answer from the other ranks within {timeout:g}s "
                     f"(a rank died, hangs or cannot be reached; {TIMEOUT_ENV} sets the limit)")


@dataclass
class World:
    """The processes of one run: ``rank`` of ``size``; ``group`` is the ``mx.distributed``
    group (None for a single process, where every collective returns its input)."""

    rank: int = 0
    size: int = 1
    backend: Optional[str] = None
    group: Any = None
    timeout: float = DEFAULT_TIMEOUT
    exit_on_failure: bool = False  # set by ``start()``: a lost peer ends the process
    _watchdog: Optional[_Watchdog] = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def main_only(self, fn: Optional[Callable]) -> Optional[Callable]:
        """``fn`` on rank 0; a function that does nothing on the other ranks."""
        if fn is None or self.is_main:
            return fn
        return lambda *a, **k: None

    def note(self, text: Optional[str]) -> None:
        """A fact the error line of a failure adds (e.g. the last complete checkpoint)."""
        if self._watchdog is not None:
            self._watchdog.note = text

    # ------------------------------------------------------------------ collectives

    @contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Run the block under the watchdog (the block may wait on the other ranks)."""
        if self._watchdog is None:
            yield
            return
        with self._watchdog.guard(what, self.timeout):
            try:
                yield
            except RuntimeError as e:  # the backend noticed a dropped connection
                self._lost(what, e)

    def _lost(self, what: str, e: Exception) -> None:
        message = (f"lost the connection to the other ranks during {what} "
                   f"({one_line(e, 100)}): a rank died or cannot be reached")
        if self.exit_on_failure and self._watchdog is not None:
            self._watchdog.die(message)
        raise DistributedError(f"{self.label}: {message}") from None

    def _eval(self, arrays, what: str) -> None:
        with self.watch(what):
            mx.eval(arrays)

    def all_sum(self, tree, what: str = "a sum across ranks"):
        """The element-wise sum over the ranks of an array or a tree of arrays (same
        structure, shapes and dtypes on every rank), evaluated. Small arrays of one dtype
        travel together (buckets of about ``BUCKET_BYTES``); each sum is in the arrays'
        own dtype."""
        if self.size == 1:
            return tree
        if isinstance(tree, mx.array):
            return self.all_sum({"x": tree}, what)["x"]
        leaves = tree_flatten(tree)
        out: dict[int, mx.array] = {}
        by_dtype: dict[Any, list[int]] = {}
        for i, (_, a) in enumerate(leaves):
            by_dtype.setdefault(a.dtype, []).append(i)
        for idx in by_dtype.values():
            bucket, nbytes = [], 0
            for i in idx + [None]:
                if i is not None:
                    bucket.append(i)
                    nbytes += leaves[i][1].nbytes
                if bucket and (i is None or nbytes >= BUCKET_BYTES):
                    arrays = [leaves[j][1] for j in bucket]
                    flat = mx.concatenate([a.reshape(-1) for a in arrays]) if len(arrays) > 1 \
                        else arrays[0].reshape(-1)
                    summed = mx.distributed.all_sum(flat, group=self.group)
                    start = 0
                    for j, a in zip(bucket, arrays):
                        out[j] = summed[start:start + a.size].reshape(a.shape)
                        start += a.size
                    bucket, nbytes = [], 0
        result = [out[i] for i in range(len(leaves))]
        self._eval(result, what)
        it = iter(result)  # tree_map visits the leaves in tree_flatten's order
        return tree_map(lambda _: next(it), tree)

    def all_gather_objects(self, obj: Any, what: str = "an exchange between ranks") -> list:
        """Every rank's ``obj`` (JSON-serialisable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        sizes = mx.distributed.all_gather(mx.array([data.size], mx.int32), group=self.group)
        self._eval(sizes, what)
        sizes = sizes.tolist()
        buf = np.zeros(max(max(sizes), 1), np.uint8)
        buf[: data.size] = data
        gathered = mx.distributed.all_gather(mx.array(buf), group=self.group)
        self._eval(gathered, what)
        rows = np.array(gathered).reshape(self.size, -1)
        return [json.loads(rows[r, : sizes[r]].tobytes().decode()) for r in range(self.size)]

    def broadcast_object(self, obj: Any, what: str = "an exchange between ranks") -> Any:
        """Rank 0's ``obj`` (JSON-serialisable) on every rank (the others' is ignored)."""
        if self.size == 1:
            return obj
        return self.all_gather_objects(obj if self.is_main else None, what)[0]

    def broadcast(self, tree, what: str = "a copy from rank 0"):
        """Rank 0's arrays on every rank; the other ranks pass arrays of the same shapes
        and dtypes (their values are ignored)."""
        if self.size == 1:
            return tree
        if not self.is_main:
            tree = _zeros_like(tree)
        return self.all_sum(tree, what)

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        if self.size > 1:
            self.all_sum(mx.array(1, mx.int32), what)


def _zeros_like(tree):
    return mx.zeros_like(tree) if isinstance(tree, mx.array) else tree_map(mx.zeros_like, tree)


SINGLE = World()
_world: Optional[World] = None


def world() -> World:
    """This process's ``World``: initialised on the first call (within the watchdog's
    time limit) when ``mlx.launch`` started it, else a single process."""
    global _world
    if _world is None:
        backend = launched_backend()
        _world = SINGLE if backend is None else _init(backend)
    return _world


# The watchdog of ``mx.distributed.init``, a process of its own: init holds the GIL while
# it waits for the peers, so no thread of this process could run. Its argv: the read end
# of a pipe (a byte or end-of-file: init returned or this process died), the pid to kill,
# the timeout and the line to print.
_INIT_WATCHDOG = """
import os, select, signal, sys
r, pid, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
if not select.select([r], [], [], timeout)[0]:
    os.write(2, sys.argv[4].encode())
    os.kill(pid, signal.SIGKILL)
"""


@contextmanager
def _init_watchdog(timeout: float, line: str) -> Iterator[None]:
    import subprocess

    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _INIT_WATCHDOG, str(r),
                                 str(os.getpid()), str(timeout), line], pass_fds=(r,),
                                stdin=subprocess.DEVNULL)
    finally:
        os.close(r)
    try:
        yield
    finally:
        os.write(w, b"1")
        os.close(w)
        proc.wait()


def _init(backend: str) -> World:
    timeout, start = timeout_seconds(), timeout_seconds(name=START_TIMEOUT_ENV)
    rank = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
    dog = _Watchdog(f"rank {rank}")
    line = (f"error: rank {rank}: starting the {backend} backend: no answer from the other "
            f"ranks within {start:g}s (a rank died or cannot be reached; {START_TIMEOUT_ENV} "
            "sets the limit)\n")
    with _init_watchdog(start, line):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise DistributedError(f"rank {rank}: cannot start the {backend} backend "
                                   f"({one_line(e, 120)})") from None
    w = World(group.rank(), group.size(), backend, group, timeout, _watchdog=dog)
    dog.label = w.label
    return w


def start() -> World:
    """The command line's start: the world, with the SIGTERM handler, a lost peer ending
    the process with one line, and the ranks other than 0 quiet (their stdout dropped,
    their stderr reduced to ``error:`` lines and tracebacks)."""
    w = world()
    if w.size > 1:
        w.exit_on_failure = True
        w._watchdog.catch_sigterm()
        if not w.is_main:
            sys.stdout = open(os.devnull, "w")
            sys.stderr = _ErrorsOnly(sys.stderr, w.label)
    return w


class _ErrorsOnly(io.TextIOBase):
    """A text stream passing on only ``error:`` lines (naming the rank) and tracebacks."""

    def __init__(self, stream, label: str):
        self.stream, self.label, self._line, self._traceback = stream, label, "", False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._line += s
        while "\n" in self._line:
            line, self._line = self._line.split("\n", 1)
            self._traceback |= line.startswith("Traceback")
            if line.startswith("error:") and not line.startswith("error: rank "):
                line = f"error: {self.label}: {line[6:].lstrip()}"
            if self._traceback or line.startswith("error:"):
                self.stream.write(line + "\n")
                self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False
