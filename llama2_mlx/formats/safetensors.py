"""Checked safetensors reading: a truncated, corrupt or lying file is one line naming it.

The header is read and checked in full before a tensor byte is: every entry's dtype and
shape must account for exactly its byte range, the ranges must tile the data that
follows the header (no gap, no overlap, none past the end of the file), names are
unique. So the bytes a file declares are the bytes it holds, and what ``read_safetensors``
allocates is what is on disk.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from llama2_mlx.errors import Llama2Error, one_line
from llama2_mlx.io.readers import open_regular, parse_json

MAX_HEADER_BYTES = 16 << 20
MAX_DIMS = 8
# safetensors dtype -> bytes per element (the ones MLX loads)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a file's header declares it (nothing read yet)."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    offset: int = 0  # of its first byte in the file (past the header)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _shape(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS or not all(
        type(n) is int and 0 <= n < 1 << 40 for n in value
    ):
        raise Llama2Error(f"{where}: shape {one_line(repr(value), 60)} is not a list of sizes")
    return tuple(value)


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The checked header of a safetensors file: name -> ``TensorInfo``."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise Llama2Error(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise Llama2Error(f"{path}: corrupt safetensors header (claims {n:,} bytes)")
        if n > size - 8:
            raise Llama2Error(f"{path}: truncated or corrupt safetensors header")
        raw = f.read(n)
    if len(raw) < n:
        raise Llama2Error(f"{path}: truncated safetensors header")
    header = parse_json(raw, f"{path} (safetensors header)")
    if not isinstance(header, dict):
        raise Llama2Error(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):  # mlx writes null
                raise Llama2Error(f"{path}: corrupt safetensors header (__metadata__)")
            continue
        where = f"{path}: tensor {one_line(name, 80)}"
        if not isinstance(info, dict):
            raise Llama2Error(f"{where}: corrupt header entry")
        dtype, offsets = info.get("dtype"), info.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise Llama2Error(f"{where}: unsupported dtype {one_line(repr(dtype), 40)}")
        shape = _shape(info.get("shape"), where)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(x) is int and x >= 0 for x in offsets) and offsets[0] <= offsets[1]):
            raise Llama2Error(f"{where}: corrupt data_offsets {one_line(repr(offsets), 60)}")
        start, stop = offsets
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if stop - start != nbytes:
            raise Llama2Error(
                f"{where}: {dtype} of shape {shape} is {nbytes:,} bytes, its data_offsets "
                f"span {stop - start:,}"
            )
        out[name] = TensorInfo(shape, dtype, nbytes, 8 + n + start)
        ranges.append((start, stop, name))
    end = 0
    for start, stop, name in sorted(ranges):
        if stop > data_size:
            raise Llama2Error(
                f"{path}: truncated: tensor {name} needs bytes up to {8 + n + stop}, "
                f"the file has {size}"
            )
        if start < end:
            raise Llama2Error(f"{path}: tensor {name} overlaps the bytes of another tensor")
        if start > end:
            raise Llama2Error(f"{path}: corrupt: {start - end} unused bytes before tensor {name}")
        end = stop
    if end != data_size:
        raise Llama2Error(f"{path}: corrupt: {data_size - end:,} bytes past the last tensor")
    return out


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """Every tensor of a safetensors file, its header checked first."""
    safetensors_header(path)
    with open_regular(path) as f:
        # MLX opens the file we checked and hold open (not the name, which could now be a
        # FIFO). Not the file object itself: MLX then may abort the process at exit.
        try:
            return mx.load(f"/dev/fd/{f.fileno()}", format="safetensors")
        except Exception as e:  # mlx raises RuntimeError/ValueError on malformed files
            raise Llama2Error(f"{path}: cannot read safetensors ({one_line(e, 100)})") from None
