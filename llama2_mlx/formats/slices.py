"""Tensors as memory-mapped views, so that a slice can be read without the rest of the
tensor (tensor parallelism loads each rank's slice of every weight this way).

``safetensors_views`` gives the tensors of a safetensors file (its header checked by
``safetensors.safetensors_header`` first) as ``pth.TensorData`` views of the file, as
``pth.read_pth`` does for ``.pth`` files; ``slice_view`` cuts one, ``concat_slice`` the
slice of a tensor stored in pieces along an axis (Meta's model-parallel shards). Only
the pages of the slice are read from disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from llama2_mlx.errors import Llama2Error
from llama2_mlx.formats.pth import TensorData
from llama2_mlx.formats.safetensors import safetensors_header

# safetensors dtype -> (numpy dtype of the bytes, MLX dtype); bfloat16 bytes read as uint16.
_DTYPES = {
    "F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16), "I64": (np.int64, mx.int64), "I32": (np.int32, mx.int32),
    "I16": (np.int16, mx.int16), "I8": (np.int8, mx.int8), "U8": (np.uint8, mx.uint8),
    "U32": (np.uint32, mx.uint32), "BOOL": (np.bool_, mx.bool_),
}


def safetensors_views(path: Path) -> dict[str, TensorData]:
    """Every tensor of a safetensors file as a view of the (memory-mapped) file."""
    path = Path(path)
    out = {}
    for name, info in safetensors_header(path).items():  # dtypes, shapes and offsets checked
        if info.dtype not in _DTYPES:
            raise Llama2Error(f"{path}: tensor {name} is {info.dtype}, which is not read as a slice")
        np_dtype, mx_dtype = _DTYPES[info.dtype]
        if info.size == 0:
            arr = np.zeros(info.shape, np_dtype)
        else:
            arr = np.memmap(path, dtype=np_dtype, mode="r", offset=info.offset, shape=info.shape)
        out[name] = TensorData(arr, mx_dtype)
    return out


def slice_view(t: TensorData, axis: int, lo: int, hi: int) -> TensorData:
    """Rows (or columns ...) ``lo:hi`` of ``t`` along ``axis``, still a view."""
    index = [slice(None)] * t.array.ndim
    index[axis] = slice(lo, hi)
    return TensorData(t.array[tuple(index)], t.dtype)


def concat_slice(pieces: Sequence[TensorData], axis: int, lo: int, hi: int) -> TensorData:
    """Positions ``lo:hi`` along ``axis`` of the concatenation of ``pieces`` along it,
    reading only the pieces (and their parts) that the slice covers."""
    out, pos = [], 0
    for p in pieces:
        n = p.array.shape[axis]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(slice_view(p, axis, a - pos, b - pos).array)
        pos += n
    if not out:
        raise ValueError(f"slice {lo}:{hi} outside an axis of {pos}")
    arr = out[0] if len(out) == 1 else np.concatenate(out, axis=axis)
    return TensorData(arr, pieces[0].dtype)
