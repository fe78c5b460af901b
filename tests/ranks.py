"""Start the ranks of a distributed run on localhost for the tests (ring backend).

``spawn`` starts the ranks itself, as ``mlx.launch --backend ring`` does (a hostfile of
127.0.0.1 ports, ``MLX_RANK`` and ``MLX_HOSTFILE``), each rank in a folder of its own, so
a test sees what each rank wrote and no rank can read another's files (as on separate
machines). ``launch`` runs the real ``mlx.launch``. Every process started here is in a
session of its own and is killed in ``Ranks.close`` (also when a test fails); waits and
loops are bounded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.app"]


def free_port(count: int = 1) -> int:
    """A loopback port p with p .. p + count - 1 free (bound and released: a race with
    other programs is possible but unlikely)."""
    for _ in range(100):
        port = random.randint(20000, 60000 - count)
        socks = []
        try:
            for p in range(port, port + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free loopback port")


def environment(timeout: float = 60, start_timeout: float = 120, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLX_RANK", "MLX_HOSTFILE", "OMPI_", "PMI_", "MLX_WORLD_SIZE",
                                "MLX_JACCL"))}
    env.update(PYTHONPATH=str(ROOT), LLAMA2_DIST_TIMEOUT=str(timeout),
               LLAMA2_DIST_START_TIMEOUT=str(start_timeout), PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1")  # a rank that hangs can be made to show where
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Ranks:
    """Processes of one run: ``wait`` for them, ``close`` kills whatever is left."""

    def __init__(self, procs: list[subprocess.Popen], logs: list[Path]):
        self.procs, self.logs = procs, logs

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            left = deadline - time.monotonic()
            try:
                p.wait(max(left, 0.1))
            except subprocess.TimeoutExpired:
                self.close()
                raise AssertionError(f"ranks still running after {timeout}s:\n" + self.output())
        return [p.returncode for p in self.procs]

    def output(self, rank: Optional[int] = None) -> str:
        logs = self.logs if rank is None else [self.logs[rank]]
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" if rank is None
                         else p.read_text(errors="replace") for p in logs if p.exists())

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the session started for this process
                except ProcessLookupError:
                    pass
                p.wait(10)

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spawn(args: Sequence[str], cwds: Sequence[Path], *, env: Optional[dict] = None,
          command: Sequence[str] = CLI, only: Optional[Sequence[int]] = None) -> Ranks:
    """Start ``command + args`` as ranks 0..n-1 of one ring group (rank r in ``cwds[r]``;
    ``only`` those ranks); each rank's stdout and stderr go to ``cwds[r]/rank.log``."""
    n = len(cwds)
    port = free_port(n)
    hostfile = Path(cwds[0]).parent / f"hosts-{uuid.uuid4().hex[:8]}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
    procs, logs = [], []
    try:
        for r, cwd in enumerate(cwds):
            if only is not None and r not in only:
                continue
            log = Path(cwd) / "rank.log"
            e = dict(env or environment(), MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile))
            with open(log, "w") as f:
                procs.append(subprocess.Popen([*command, *args], cwd=cwd, env=e, stdout=f,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True))
            logs.append(log)
    except BaseException:
        Ranks(procs, logs).close()
        raise
    return Ranks(procs, logs)


def launcher() -> list[str]:
    exe = shutil.which("mlx.launch")
    return [exe] if exe else [sys.executable, "-c",
                              "from mlx._distributed_utils.launch import main; main()"]


def launch(args: Sequence[str], cwd: Path, *, n: int = 2, env: Optional[dict] = None,
           timeout: float = 180) -> subprocess.CompletedProcess:
    """``mlx.launch -n N --backend ring -- python -m cli.app ARGS`` in ``cwd``, bounded by
    ``timeout`` (the launcher's whole session is killed then)."""
    cmd = [*launcher(), "-n", str(n), "--backend", "ring", "-p", str(free_port(n)), "--",
           *CLI, *args]
    # stdin a pipe that stays open: the launcher polls stdin (a /dev/null would spin).
    p = subprocess.Popen(cmd, cwd=cwd, env=env or environment(), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=10)
        raise AssertionError(f"mlx.launch still running after {timeout}s:\n{out}\n{err}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
