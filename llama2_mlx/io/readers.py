"""Checked readers of the files the project takes as input (JSON, JSONL, YAML, raw bytes).

Every failure is one ``Llama2Error`` line naming the file (and the line, for JSONL and
YAML), and no input can make a reader hang or use memory out of proportion to a bound:

* only regular files are read: a FIFO, a device (``/dev/zero``) or a folder is refused
  before it is read (the file is opened non-blocking and checked again after opening);
* every reader has a size bound (``MAX_JSON_BYTES`` ...), checked against the file's size
  before reading and against the bytes actually read; a JSONL file is streamed, and a line
  longer than ``MAX_LINE_BYTES`` is refused by its number before it is held in memory;
* text is strict UTF-8 (JSONL lines split on ``\\n`` only: U+2028 inside a record is
  text); a lone surrogate (``"\\ud800"``), nesting deeper than ``MAX_DEPTH``, a duplicate
  key, a number of more digits than Python converts, are one line each;
* YAML is read without aliases (``*name``), so a small file cannot expand to gigabytes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

from llama2_mlx.errors import Llama2Error, one_line

PathLike = Union[str, os.PathLike]

MAX_JSON_BYTES = 16 << 20  # config.json, params.json, index.json, adapter / run state
MAX_YAML_BYTES = 1 << 20  # a --config file of options
MAX_JSONL_BYTES = 1 << 30  # a data file (streamed, one record at a time)
MAX_LINE_BYTES = 8 << 20  # one JSONL record
MAX_DEPTH = 64  # nesting of JSON / YAML values

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


# ----------------------------------------------------------------------------- files


def _oserror(path, e: OSError) -> Llama2Error:
    if isinstance(e, FileNotFoundError):
        return Llama2Error(f"{path}: not found")
    return Llama2Error(f"{path}: cannot read ({e.strerror or one_line(e, 80)})")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def is_regular(path: PathLike) -> bool:
    """Whether ``path`` is (or links to) a regular file; never raises (a name too long,
    a dangling link, a loop: False)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def exists(path: PathLike) -> bool:
    """``Path.exists`` that never raises (a name too long for the system is False)."""
    try:
        os.stat(path)
        return True
    except (OSError, ValueError):
        return False


def file_size(path: PathLike) -> Optional[int]:
    """The size of regular file ``path`` in bytes; None if it is none (never raises)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def is_dir(path: PathLike) -> bool:
    """``Path.is_dir`` that never raises."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def check_regular(path: PathLike) -> os.stat_result:
    """``os.stat`` of ``path``, which must be a regular file (else one ``Llama2Error`` line)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _oserror(path, e) from None
    except ValueError:  # an embedded NUL
        raise Llama2Error(f"{path!r}: not a valid file name") from None
    if not stat.S_ISREG(st.st_mode):
        raise Llama2Error(f"{path}: is {_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: PathLike, limit: Optional[int] = None) -> BinaryIO:
    """``path`` opened for binary reading, refused unless it is a regular file (of at
    most ``limit`` bytes). It is opened non-blocking, so that a FIFO put in its place
    after the check cannot hang the open, and checked again once open."""
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _oserror(path, e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Llama2Error(f"{path}: is {_kind(st.st_mode)}, not a regular file")
        if limit is not None and st.st_size > limit:
            raise Llama2Error(
                f"{path}: {st.st_size:,} bytes, more than the {limit:,} this file may have"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_in(folder: Path, name: Any, where: str) -> Path:
    """``folder / name`` for ``name`` a plain file name (``where``, e.g. an index file,
    gave it) that stays inside ``folder`` (``inside``)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or len(name) > 255
            or any(c in name for c in "/\\\0")):
        raise Llama2Error(f"{where}: {one_line(repr(name), 60)} is not a file name in {folder}")
    return inside(Path(folder) / name, folder)


def inside(path: Path, folder: Path) -> Path:
    """``path``, refused when it is a symlink leading outside ``folder`` (a weight file
    must be part of its model folder), except into the ``blobs`` of the Hugging Face
    cache when ``folder`` is one of its snapshots (which link there)."""
    try:
        real, root = Path(path).resolve(), Path(folder).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise Llama2Error(f"{path}: cannot resolve ({one_line(e, 80)})") from None
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(real.is_relative_to(r) for r in roots):
        raise Llama2Error(f"{path}: leads outside the model folder {folder} (to {real})")
    return Path(path)


def read_bytes(path: PathLike, limit: int) -> bytes:
    """The bytes of regular file ``path``, which may hold at most ``limit`` of them."""
    with open_regular(path, limit) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise _oserror(path, e) from None
    if len(data) > limit:  # a file that grew, or one whose size the system does not tell
        raise Llama2Error(f"{path}: more than the {limit:,} bytes this file may have")
    return data


# ----------------------------------------------------------------------------- values


def _decode(data: bytes, where: str, line: Optional[int] = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if line is None:
            line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise Llama2Error(
            f"{where}: not UTF-8 text (line {line}: byte 0x{data[e.start]:02x} at column {column})"
        ) from None


def _unique_keys(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return d


class _Duplicate(ValueError):
    pass


def _walk(value: Any, where: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings holding a lone surrogate."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise Llama2Error(f"{where}: a string holds a lone surrogate ({ascii(v)[:40]})")
            continue
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise Llama2Error(f"{where}: nested more than {MAX_DEPTH} levels deep")
            items = list(v.keys()) + list(v.values()) if isinstance(v, dict) else v
            stack.extend((x, depth + 1) for x in items)


def parse_json(data: bytes, where: str, line: Optional[int] = None) -> Any:
    """The JSON value in ``data`` (UTF-8 bytes), checked as described in this module;
    ``where`` names the file in errors (``line``: the JSONL line ``data`` is)."""
    at = f"{where} line {line}" if line is not None else where
    text = _decode(data, where, line).removeprefix("\ufeff")
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        pos = f"column {e.colno}" if line is not None else f"line {e.lineno}"
        raise Llama2Error(f"{at}: invalid JSON ({e.msg}, {pos})") from None
    except _Duplicate as e:
        raise Llama2Error(f"{at}: duplicate key {one_line(repr(e.args[0]), 60)}") from None
    except RecursionError:
        raise Llama2Error(f"{at}: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise Llama2Error(f"{at}: invalid JSON ({one_line(e, 80)})") from None
    # Cheap tests first: only a value that could be too deep or hold a surrogate is walked.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH or _SURROGATE_ESCAPE.search(data):
        _walk(value, at)
    return value


def read_json(path: PathLike, limit: int = MAX_JSON_BYTES) -> dict:
    """A JSON file that must hold an object; every failure is one line naming the file."""
    value = parse_json(read_bytes(path, limit), str(path))
    if not isinstance(value, dict):
        raise Llama2Error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def iter_lines(path: PathLike, limit: Optional[int] = None,
               line_limit: Optional[int] = None) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line of a text file, split on ``\\n`` only; streamed,
    with at most ``line_limit`` bytes a line (default MAX_LINE_BYTES) and ``limit`` bytes
    in all (default MAX_JSONL_BYTES)."""
    limit = MAX_JSONL_BYTES if limit is None else limit
    line_limit = MAX_LINE_BYTES if line_limit is None else line_limit
    with open_regular(path, limit) as f:
        total = 0
        for i in itertools.count(1):
            try:
                line = f.readline(line_limit + 1)
            except OSError as e:
                raise _oserror(path, e) from None
            if not line:
                return
            total += len(line)
            if len(line) > line_limit and not line.endswith(b"\n"):
                raise Llama2Error(
                    f"{path} line {i}: longer than {line_limit:,} bytes (not a record of a "
                    "JSONL file?)"
                )
            if total > limit:
                raise Llama2Error(f"{path}: more than the {limit:,} bytes this file may have")
            yield i, line


def read_jsonl(path, strings: bool = False) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL file (``strings``: a bare
    JSON string ``s`` is accepted as the record ``{"prompt": s}``)."""
    path = Path(path)
    if not exists(path):
        raise Llama2Error(f"{path}: data file not found")
    records = []
    for i, line in iter_lines(path):
        if not line.strip():
            continue
        rec = parse_json(line, str(path), i)
        if strings and isinstance(rec, str):
            rec = {"prompt": rec}
        if not isinstance(rec, dict):
            raise Llama2Error(f"{path} line {i}: expected a JSON object, got {type(rec).__name__}")
        records.append((i, rec))
    if not records:
        raise Llama2Error(f"{path}: empty file (no records)")
    return records


# ----------------------------------------------------------------------------- YAML


def _yaml_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """SafeLoader without aliases (``*name``): what a billion-laughs file expands by."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"aliases (*{event.anchor}) are not allowed", event.start_mark
                )
            if len(self.depth_marks) > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark,
                )
            self.depth_marks.append(None)
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth_marks.pop()

        def __init__(self, stream):
            super().__init__(stream)
            self.depth_marks: list = []

    return yaml, NoAliasLoader


def parse_yaml(text: str, where: str) -> Any:
    """The YAML value of ``text`` (one document, no aliases, bounded nesting)."""
    yaml, loader = _yaml_loader()
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise Llama2Error(
            f"{where}{line}: invalid YAML ({one_line(getattr(e, 'problem', None) or e, 100)})"
        ) from None
    except RecursionError:
        raise Llama2Error(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise Llama2Error(f"{where}: invalid YAML ({one_line(e, 80)})") from None


def read_options(path: PathLike) -> dict[str, Any]:
    """A YAML or JSON (by the ``.json`` suffix) file holding a mapping of option names:
    the mapping, {} for an empty file. Keys must be strings."""
    path = Path(path)
    if path.suffix == ".json":
        values = parse_json(read_bytes(path, MAX_YAML_BYTES), str(path))
    else:
        data = read_bytes(path, MAX_YAML_BYTES)
        values = parse_yaml(_decode(data, str(path)), str(path))
        _walk(values, str(path))
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise Llama2Error(f"{path}: expected a mapping of option names to values")
    for k in values:
        if not isinstance(k, str):
            raise Llama2Error(f"{path}: option name {one_line(repr(k), 40)} is not a string")
    return values
