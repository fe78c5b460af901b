"""Hostile inputs, built by the tests themselves, and a runner that checks how the real
``llama2`` command ends on them.

``run_cli`` runs ``python -m cli.app ...`` as a child process (in a folder of the test's,
with this worktree first on ``PYTHONPATH``, offline) and returns an ``Ended``: exit code,
output, the child's peak resident memory (``ru_maxrss`` from ``os.wait4`` in a small
launcher process, which counts what was really touched; MLX reserves far more virtual
memory than it uses, so an address-space bound would measure nothing useful) and whether
it ran past its timeout (then the child is killed).
An address-space limit (``ADDRESS_SPACE``, 4 GiB) is still set, only as a safety net: an
input that would make the child allocate without end makes it fail early rather than
exhaust the machine. ``assert_one_line_error`` is the project's promise for bad input:
exit status 2, exactly one ``error:`` line naming what is at fault, no traceback, no hang,
bounded memory.

The builders write the hostile files: a torch-style zip with hand-written pickle opcodes
(no torch needed) for stride-0 views, zip bombs and shared storages; safetensors files
with any header; FIFOs; links to devices; JSON nested or with huge integers; YAML alias
bombs.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60
MAX_RSS_MB = 500
ADDRESS_SPACE = 4 << 30


# ----------------------------------------------------------------------------- running


@dataclass
class Ended:
    """How a child ``llama2`` process ended."""

    args: tuple[str, ...]
    returncode: Optional[int]
    stdout: str
    stderr: str
    max_rss_mb: float
    seconds: float
    timed_out: bool

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def __str__(self) -> str:
        tail = "\n".join(self.stderr.splitlines()[-6:])
        return (f"llama2 {' '.join(a[:60] for a in self.args)}: rc={self.returncode} "
                f"rss={self.max_rss_mb:.0f}MB {self.seconds:.1f}s timed_out={self.timed_out}\n"
                f"{tail}")


# The child is started by a small launcher, which reports its peak RSS: Linux carries a
# process's peak RSS across exec from the process it was forked from, so a child forked
# from pytest directly would report pytest's own size.
_LAUNCHER = """
import json, os, resource, sys
report, limit, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"status": status, "maxrss_kb": usage.ru_maxrss}, f)
"""


def _group_peak_rss_kb(pgid: int) -> int:
    """The largest peak RSS (VmHWM) among the live processes of process group ``pgid``."""
    peak = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            continue
    return peak


def run_cli(*args: str, cwd, timeout: float = TIMEOUT_S, address_space: int = ADDRESS_SPACE,
            stdin: Optional[str] = None, env: Optional[dict] = None) -> Ended:
    """Run ``llama2 ARGS`` (``python -m cli.app``) in folder ``cwd``; see the module doc."""
    cwd = Path(cwd)
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    out_path, err_path = cwd / ".hostile.stdout", cwd / ".hostile.stderr"
    report = cwd / ".hostile.report"
    command = [sys.executable, "-S", "-c", _LAUNCHER, str(report), str(address_space),
               sys.executable, "-m", "cli.app", *args]
    start = time.monotonic()
    timed_out = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = subprocess.Popen(command, cwd=cwd, env=child_env, stdout=out, stderr=err,
                             stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                             start_new_session=True)
        try:
            p.communicate(stdin.encode() if stdin is not None else None, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            hung_rss_kb = _group_peak_rss_kb(p.pid)
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and the child
            p.wait()
    seconds = time.monotonic() - start
    got = json.loads(report.read_text()) if report.exists() else None
    if timed_out:
        got = {"status": 0, "maxrss_kb": hung_rss_kb}
    returncode = None if timed_out or got is None else os.waitstatus_to_exitcode(got["status"])
    ended = Ended(tuple(args), returncode, out_path.read_bytes().decode(errors="replace"),
                  err_path.read_bytes().decode(errors="replace"),
                  got["maxrss_kb"] / 1024 if got else float("nan"), seconds, timed_out)
    for f in (out_path, err_path, report):
        f.unlink(missing_ok=True)
    if os.environ.get("HOSTILE_REPORT"):  # a line per run, for the tables of a note
        with open(os.environ["HOSTILE_REPORT"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                                "args": [a[:80] for a in args], "rc": returncode,
                                "rss_mb": round(ended.max_rss_mb, 1),
                                "seconds": round(seconds, 2), "timed_out": timed_out,
                                "traceback": "Traceback" in ended.stderr,
                                "error_lines": len(ended.error_lines)}) + "\n")
    return ended


def assert_one_line_error(ended: Ended, *needles, max_rss_mb: float = MAX_RSS_MB) -> str:
    """The promise for bad input: exit 2, one ``error:`` line holding every needle, no
    traceback, no hang, peak memory under ``max_rss_mb``. Returns the error line."""
    assert not ended.timed_out, f"hung: {ended}"
    assert "Traceback" not in ended.stderr, f"traceback: {ended}"
    assert ended.returncode == 2, f"exit code: {ended}"
    lines = ended.error_lines
    assert len(lines) == 1, f"want one error line: {ended}"
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert ended.max_rss_mb < max_rss_mb, f"peak memory: {ended}"
    return lines[0]


# ----------------------------------------------------------------------------- pickles


class Tensor:
    """A tensor in a hand-written torch pickle: storage ``key`` of ``numel`` elements of
    torch storage class ``storage``, viewed with ``size``, ``stride`` from ``offset``."""

    def __init__(self, key: str, size: Iterable[int], stride: Optional[Iterable[int]] = None,
                 offset: int = 0, numel: Optional[int] = None, storage: str = "FloatStorage"):
        self.key, self.size, self.offset, self.storage = key, tuple(size), offset, storage
        if stride is None:  # contiguous
            stride, run = [], 1
            for n in reversed(self.size):
                stride.insert(0, run)
                run *= n
        self.stride = tuple(stride)
        n = 1
        for s in self.size:
            n *= s
        self.numel = n if numel is None else numel


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    b = pickle.encode_long(n)
    return b"\x8a" + bytes([len(b)]) + b


def _tuple(items: Iterable[int]) -> bytes:
    return b"(" + b"".join(_int(n) for n in items) + b"t"


def tensor_pickle(tensors: dict[str, Tensor]) -> bytes:
    """The data.pkl of ``torch.save(tensors)``, written opcode by opcode (protocol 2)."""
    out = [b"\x80\x02}("]
    for name, t in tensors.items():
        out.append(_str(name))
        out.append(b"ctorch._utils\n_rebuild_tensor_v2\n(")
        out.append(b"(" + _str("storage") + f"ctorch\n{t.storage}\n".encode() + _str(t.key)
                   + _str("cpu") + _int(t.numel) + b"tQ")
        out.append(_int(t.offset) + _tuple(t.size) + _tuple(t.stride))
        out.append(b"\x89ccollections\nOrderedDict\n)Rt" + b"R")
    out.append(b"u.")
    return b"".join(out)


# ----------------------------------------------------------------------------- zips


def zip_file(path: Path, entries: list[tuple[str, bytes, int, int, int]],
             aliases: Optional[dict[str, str]] = None) -> Path:
    """A zip of (name, stored bytes, method, crc, uncompressed size) entries, written by
    hand so that an entry may claim anything; ``aliases`` adds central-directory entries
    (name -> the entry whose local header and bytes they point at)."""
    central, at = bytearray(), {}

    def directory(name, method, crc, n_data, size, offset):
        n = name.encode()
        return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc,
                           n_data, size, len(n), 0, 0, 0, 0, 0, offset) + n

    with open(path, "wb") as f:
        for name, data, method, crc, size in entries:
            n = name.encode()
            at[name] = (method, crc, len(data), size, f.tell())
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data),
                                size, len(n), 0) + n)
            f.write(data)
            central += directory(name, *at[name])
        for name, target in (aliases or {}).items():
            central += directory(name, *at[target])
        count = len(entries) + len(aliases or {})
        start = f.tell()
        f.write(bytes(central))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), start, 0))
    return path


def stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return name, data, 0, zlib.crc32(data), len(data)


def deflated_zeros(name: str, size: int) -> tuple[str, bytes, int, int, int]:
    """An entry that inflates to ``size`` zero bytes from about size / 1000 bytes (the CRC
    is not computed: a reader that checks it has inflated everything by then)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = c.compress(b"\0" * (1 << 24)) + c.flush(zlib.Z_FULL_FLUSH)
    data = chunk * (size >> 24) + c.flush()
    return name, data, 8, 0, size


def torch_zip(path: Path, tensors: dict[str, Tensor], records: Optional[dict] = None,
              aliases: Optional[dict[str, str]] = None, prefix: str = "archive") -> Path:
    """A ``torch.save``-style zip: data.pkl for ``tensors`` and a stored ``data/<key>``
    record of zeros for each storage; ``records`` replaces a key's record (an entry from
    ``stored`` / ``deflated_zeros``, whose name is replaced) or drops it (None);
    ``aliases`` (key -> key) adds records pointing at another's bytes."""
    itemsize = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8}
    chosen: dict = dict(records or {})
    for t in tensors.values():
        if t.key not in chosen:
            chosen[t.key] = stored("", bytes(t.numel * itemsize.get(t.storage, 4)))
    entries = [stored(f"{prefix}/data.pkl", tensor_pickle(tensors)),
               stored(f"{prefix}/byteorder", b"little")]
    entries += [(f"{prefix}/data/{k}", *e[1:]) for k, e in chosen.items() if e is not None]
    return zip_file(path, entries, {f"{prefix}/data/{k}": f"{prefix}/data/{v}"
                                    for k, v in (aliases or {}).items()})


# ----------------------------------------------------------------------------- safetensors


def safetensors_file(path: Path, header: dict, data: bytes = b"", raw_header: Optional[bytes] = None
                     ) -> Path:
    """A safetensors file with exactly this header (or these header bytes) and data."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


# ----------------------------------------------------------------------------- text


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def huge_int(digits: int = 5000) -> str:
    return "9" * digits


def yaml_alias_bomb(levels: int = 9, width: int = 9, option: str = "model") -> str:
    """The billion laughs: ``width ** levels`` strings from a few hundred bytes, as the
    value of ``option`` (so that a reader that expands aliases hands it on)."""
    lines = [f"{option}:", '  - &a0 ["lol"' + ', "lol"' * (width - 1) + "]"]
    for i in range(1, levels):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def long_line_file(path: Path, megabytes: int, record: bool = True) -> Path:
    """A JSONL file of one line of ``megabytes`` MB (a JSON string record), streamed out."""
    with open(path, "wb") as f:
        f.write(b'{"prompt": "')
        chunk = b"a" * (1 << 20)
        for _ in range(megabytes):
            f.write(chunk)
        f.write(b'", "response": "b"}\n' if record else b"\n")
    return path


# ----------------------------------------------------------------------------- not files


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def link(path: Path, target) -> Path:
    os.symlink(target, path)
    return path
