"""Checked safetensors reading: a truncated or corrupt file is one line naming it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx

from llama2_mlx.errors import Llama2Error, one_line


def safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header, so a truncated file names its first lost tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise Llama2Error(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 1 << 28:
                raise Llama2Error(f"{path}: truncated or corrupt safetensors header")
            header = json.loads(f.read(n))
    except OSError as e:
        raise Llama2Error(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Llama2Error(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise Llama2Error(f"{path}: corrupt safetensors header")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise Llama2Error(f"{path}: corrupt header entry for tensor {name}") from None
        entries.append((start, stop, name))
    for start, stop, name in sorted(entries):
        if 8 + n + stop > size:
            raise Llama2Error(
                f"{path}: truncated: tensor {name} needs bytes up to {8 + n + stop}, "
                f"the file has {size}"
            )
    return header


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """Every tensor of a safetensors file, its header checked first."""
    safetensors_header(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError on malformed files
        raise Llama2Error(f"{path}: cannot read safetensors ({one_line(e, 100)})") from None
