"""A safe reader for PyTorch ``.pth`` checkpoints (``torch.save``'s zip format).

``torch.load`` unpickles arbitrary Python, so a hostile checkpoint can run code.
This reader never imports torch: it unpickles ``data.pkl`` with an unpickler
whose ``find_class`` knows only what a state dict needs (the tensor-rebuild
functions, the storage classes, dtypes and ``OrderedDict``) and refuses
everything else *before* it can be called. Tensor bytes are memory-mapped
from the uncompressed ``data/<key>`` records.

Layout of a checkpoint written by ``torch.save`` (format version 1.6+)::

    <name>/data.pkl          the pickled object; tensors refer to storages by key
    <name>/data/<key>        raw bytes of one storage
    <name>/byteorder         "little" or "big" (absent in old files: little)
    <name>/version, .format_version, .storage_alignment, .data/serialization_id
"""

from __future__ import annotations

import collections
import io
import math
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from llama2_mlx.errors import Llama2Error, one_line
from llama2_mlx.io.readers import open_regular

# torch storage class name -> (numpy dtype of the raw bytes, mlx dtype of the tensor).
# bfloat16 has no numpy dtype: its bytes are read as uint16 and viewed in MLX.
_STORAGES = {
    "FloatStorage": (np.float32, mx.float32),
    "HalfStorage": (np.float16, mx.float16),
    "BFloat16Storage": (np.uint16, mx.bfloat16),
    "DoubleStorage": (np.float64, mx.float32),  # MLX has no float64 on every backend
    "LongStorage": (np.int64, mx.int64),
    "IntStorage": (np.int32, mx.int32),
    "ShortStorage": (np.int16, mx.int16),
    "CharStorage": (np.int8, mx.int8),
    "ByteStorage": (np.uint8, mx.uint8),
    "BoolStorage": (np.bool_, mx.bool_),
}
# torch dtype objects (pickled as the global ``torch.<name>``, used by _rebuild_tensor_v3).
_DTYPES = {
    "float32": "FloatStorage", "float": "FloatStorage",
    "float16": "HalfStorage", "half": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "float64": "DoubleStorage", "double": "DoubleStorage",
    "int64": "LongStorage", "long": "LongStorage",
    "int32": "IntStorage", "int": "IntStorage",
    "int16": "ShortStorage", "short": "ShortStorage",
    "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
}
_EXTRA_DTYPES = {  # the "new" dtypes torch saves with _rebuild_tensor_v3
    "uint16": (np.uint16, mx.uint16),
    "uint32": (np.uint32, mx.uint32),
    "uint64": (np.uint64, mx.uint64),
}


class _Refused(Exception):
    pass


class _Sealed:
    """A pickle's BUILD opcode must not alter the objects this reader hands out."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"{type(self).__name__}.__setstate__")


@dataclass(frozen=True, slots=True)
class _StorageType(_Sealed):
    """Stands in for ``torch.FloatStorage`` & co. and for ``torch.float32`` & co."""

    name: str
    np_dtype: Any
    mx_dtype: Any

    __setstate__ = _Sealed.__setstate__


def _storage_type(name: str) -> Optional[_StorageType]:
    if name in _STORAGES:
        return _StorageType(name, *_STORAGES[name])
    if name == "UntypedStorage":
        return _StorageType(name, np.uint8, mx.uint8)
    return None


def _dtype_type(name: str) -> Optional[_StorageType]:
    if name in _DTYPES:
        return _StorageType(name, *_STORAGES[_DTYPES[name]])
    if name in _EXTRA_DTYPES:
        return _StorageType(name, *_EXTRA_DTYPES[name])
    return None


@dataclass(frozen=True, slots=True)
class _Storage(_Sealed):
    key: str
    stype: _StorageType
    numel: int

    __setstate__ = _Sealed.__setstate__


@dataclass(frozen=True, slots=True)
class TensorData(_Sealed):
    """One tensor of a checkpoint: a numpy view of its (memory-mapped) bytes.

    ``array`` holds the raw values (uint16 for bfloat16); ``dtype`` is the MLX dtype.
    """

    array: np.ndarray
    dtype: Any

    __setstate__ = _Sealed.__setstate__

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def to_mx(self) -> mx.array:
        a = np.ascontiguousarray(self.array)
        if a.dtype.byteorder == ">":  # a big-endian file: swapped only now, when it is used
            a = a.astype(a.dtype.newbyteorder("="))
        if self.dtype == mx.bfloat16:
            return mx.array(a.view(np.uint16)).view(mx.bfloat16)
        out = mx.array(a)
        return out if out.dtype == self.dtype else out.astype(self.dtype)


def _global_name(module: str, name: str) -> str:
    if module in ("posix", "nt"):  # what os.system & co. pickle as
        module = "os"
    return f"{module}.{name}"


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state dict needs; anything else is refused."""

    def __init__(self, file, path: Path, storages: "_StorageReader"):
        super().__init__(file)
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str):
        if module == "torch._utils":
            fn = {
                "_rebuild_tensor_v2": self._rebuild_tensor_v2,
                "_rebuild_tensor_v3": self._rebuild_tensor_v3,
                "_rebuild_parameter": self._rebuild_parameter,
                "_rebuild_parameter_with_state": self._rebuild_parameter,
            }.get(name)
            if fn is not None:
                return fn
        elif module == "torch" or module == "torch.storage":
            found = _storage_type(name) or (_dtype_type(name) if module == "torch" else None)
            if found is not None:
                return found
        elif module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise _Refused(_global_name(module, name))

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise Llama2Error(f"{self._path}: unsupported storage reference {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(numel, int):
            raise Llama2Error(f"{self._path}: malformed storage reference {pid!r:.80}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        return _Storage(key, stype, numel)

    def _tensor(self, storage, offset, size, stride, dtype: Optional[_StorageType]):
        if not isinstance(storage, _Storage):
            raise Llama2Error(f"{self._path}: a tensor without a storage")
        try:
            size, stride, offset = tuple(map(int, size)), tuple(map(int, stride)), int(offset)
        except (TypeError, ValueError):
            raise Llama2Error(f"{self._path}: malformed tensor header") from None
        return self._storages.tensor(storage, offset, size, stride, dtype)

    @staticmethod
    def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
        return data  # an nn.Parameter is just its tensor here

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return self._tensor(storage, offset, size, stride, None)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks,
                           dtype, metadata=None):
        if not isinstance(dtype, _StorageType):
            raise Llama2Error(f"{self._path}: malformed tensor dtype")
        return self._tensor(storage, offset, size, stride, dtype)


class _StorageReader:
    """Memory-maps the storage records of the zip and cuts tensors out of them."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str, fh):
        self.path, self.zf, self.prefix, self.fh = path, zf, prefix, fh
        self.size = os.fstat(fh.fileno()).st_size
        self._mm: Optional[mmap.mmap] = None
        self._cache: dict[str, np.ndarray] = {}
        self._records: list[tuple[int, int, str]] = []  # (start, stop, key) in the file
        self._spans: dict[int, tuple[str, int, int]] = {}  # id(tensor) -> (key, first, last)
        order = "little"
        if prefix + "byteorder" in zf.NameToInfo:
            order = _small_record(path, zf, prefix + "byteorder").decode(errors="replace").strip()
        self.swap = order != "little"

    def _record(self, key: str, nbytes: int) -> memoryview | bytes:
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise Llama2Error(f"{self.path}: storage record {name} is missing") from None
        # torch.save stores tensor bytes raw. A compressed record could inflate to any
        # size (a zip bomb), so it is refused rather than read.
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise Llama2Error(
                f"{self.path}: storage record {name} is compressed; torch.save stores tensor "
                "bytes uncompressed (re-save the checkpoint with torch.save)"
            )
        if nbytes < 0 or nbytes > self.size:
            raise Llama2Error(
                f"{self.path}: storage {key} claims {nbytes:,} bytes, the file has {self.size:,}"
            )
        # The record is stored raw: find its bytes after the local file header.
        self.fh.seek(info.header_offset)
        head = self.fh.read(30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise Llama2Error(f"{self.path}: corrupt zip entry {name}")
        n_name, n_extra = struct.unpack("<HH", head[26:30])
        if self.fh.read(n_name) != info.orig_filename.encode("utf-8", "surrogateescape"):
            raise Llama2Error(f"{self.path}: corrupt zip entry {name} (its local header "
                              "names another record)")
        start = info.header_offset + 30 + n_name + n_extra
        if start + info.file_size > self.size:
            raise Llama2Error(f"{self.path}: truncated (record {name} runs past the end)")
        if info.file_size == 0:
            return b""
        if self._mm is None:
            self._mm = mmap.mmap(self.fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._records.append((start, start + info.file_size, key))
        return memoryview(self._mm)[start : start + info.file_size]

    def _storage(self, st: _Storage) -> np.ndarray:
        cached = self._cache.get(st.key)
        if cached is not None:
            return cached
        itemsize = np.dtype(st.stype.np_dtype).itemsize
        nbytes = st.numel * itemsize
        raw = self._record(st.key, nbytes)
        if len(raw) != nbytes:
            raise Llama2Error(
                f"{self.path}: storage {st.key} holds {len(raw):,} bytes, its header says {nbytes:,}"
            )
        arr = np.frombuffer(raw, dtype=np.uint8, count=nbytes)
        self._cache[st.key] = arr
        return arr

    def tensor(self, st: _Storage, offset: int, size, stride, dtype: Optional[_StorageType]):
        stype = dtype or st.stype
        if (len(size) != len(stride) or len(size) > _MAX_DIMS or offset < 0
                or not all(0 <= n < 1 << 40 for n in size) or min(stride, default=0) < 0):
            raise Llama2Error(f"{self.path}: malformed tensor header (storage {st.key})")
        if not _dense(size, stride):
            raise Llama2Error(
                f"{self.path}: a tensor of storage {st.key} (shape {size}, strides {stride}) "
                "repeats its elements (stride 0 or overlapping strides): not a weight"
            )
        itemsize = np.dtype(stype.np_dtype).itemsize
        raw = self._storage(st)
        if raw.size % itemsize:
            raise Llama2Error(f"{self.path}: storage {st.key} is not a whole number of items")
        np_dtype = np.dtype(stype.np_dtype)
        if self.swap and itemsize > 1:  # viewed big-endian; swapped when used (to_mx)
            np_dtype = np_dtype.newbyteorder(">")
        flat = raw.view(np_dtype)
        numel = math.prod(size)
        if numel == 0:
            return TensorData(np.zeros(size, np_dtype), stype.mx_dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise Llama2Error(f"{self.path}: tensor runs past its storage {st.key}")
        contiguous = all(
            s == math.prod(size[i + 1 :]) for i, (n, s) in enumerate(zip(size, stride)) if n > 1
        )
        if contiguous:
            arr = flat[offset : offset + numel].reshape(size)
        else:
            arr = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
            )
        out = TensorData(arr, stype.mx_dtype)
        self._spans[id(out)] = (st.key, offset * itemsize, (last + 1) * itemsize)
        return out

    def check_no_sharing(self, tensors: dict[str, "TensorData"]) -> None:
        """Refuse storage bytes that serve two tensors, or two records: a file must hold
        every byte of the weights it declares (no view reuses another's elements)."""
        spans = sorted((*self._spans[id(t)], name) for name, t in tensors.items()
                       if id(t) in self._spans)
        last = ("", 0, 0, "")  # the span reaching furthest so far
        for span in spans:
            if span[0] == last[0] and span[1] < last[2]:
                raise Llama2Error(
                    f"{self.path}: tensors {last[3]} and {span[3]} share storage bytes "
                    f"(storage {span[0]}); each weight must have its own"
                )
            if span[0] != last[0] or span[2] > last[2]:
                last = span
        end, previous = 0, ""
        for start, stop, key in sorted(self._records):
            if start < end:
                raise Llama2Error(
                    f"{self.path}: storage records {previous} and {key} overlap in the file "
                    "(corrupt zip)"
                )
            if stop > end:
                end, previous = stop, key


_MAX_DIMS = 8
MAX_PICKLE_BYTES = 16 << 20  # data.pkl of a 70B shard is well under 1 MB
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _prescan(path: Path, data: bytes) -> None:
    """Walk the pickle's opcodes before it runs: a memo index far past the pickle's size
    (``LONG_BINPUT 2**31``, 13 bytes) would make the unpickler allocate gigabytes."""
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _MEMO_PUTS and not 0 <= int(arg) <= len(data):
                raise Llama2Error(f"{path}: corrupt pickle (memo index {arg})")
            if op.name == "STOP":
                return
    except (ValueError, TypeError) as e:
        raise Llama2Error(f"{path}: not a PyTorch checkpoint (corrupt pickle: "
                          f"{one_line(e, 60)})") from None


def _dense(size, stride) -> bool:
    """Whether no two indices of the view (size, stride) address the same element."""
    dims = sorted((s, n) for n, s in zip(size, stride) if n > 1)
    extent = 1
    for s, n in dims:
        if s < extent:
            return False
        extent = s * n
    return True


def _small_record(path: Path, zf: zipfile.ZipFile, name: str) -> bytes:
    """A metadata record (data.pkl, byteorder) of at most MAX_PICKLE_BYTES, read bounded."""
    info = zf.getinfo(name)
    if info.file_size > MAX_PICKLE_BYTES:
        raise Llama2Error(
            f"{path}: record {name} is {info.file_size:,} bytes (at most {MAX_PICKLE_BYTES:,})"
        )
    try:
        with zf.open(info) as f:
            data = f.read(MAX_PICKLE_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError,
            RuntimeError, ValueError) as e:
        raise Llama2Error(f"{path}: corrupt record {name} ({one_line(e, 80)})") from None
    if len(data) > MAX_PICKLE_BYTES:
        raise Llama2Error(f"{path}: record {name} inflates past {MAX_PICKLE_BYTES:,} bytes")
    return data


def _refusal(path: Path, what: str) -> Llama2Error:
    return Llama2Error(
        f"refusing to load {path}: it calls {what}; only tensor data is allowed"
    )


def _scan_plain_pickle(path: Path, data: bytes) -> Llama2Error:
    """A non-zip file: unpickle safely only to say what it is (legacy or hostile)."""
    _prescan(path, data)
    up = _SafeUnpickler(io.BytesIO(data), path, None)  # type: ignore[arg-type]
    up.persistent_load = lambda pid: None  # legacy storages: never reached for data
    try:
        first = up.load()
    except _Refused as e:
        return _refusal(path, str(e))
    except Exception:
        return Llama2Error(f"{path}: not a PyTorch checkpoint (corrupt or truncated pickle)")
    if first == 0x1950A86A20F9469CFC6C:  # torch's legacy magic number
        return Llama2Error(
            f"{path}: legacy (pre-1.6) torch format is not supported; "
            "re-save it with a recent torch.save"
        )
    return Llama2Error(f"{path}: not a PyTorch zip checkpoint")


def read_pth(path: str | os.PathLike) -> dict[str, TensorData]:
    """Read a ``torch.save``'d state dict without torch and without running its pickle.

    Returns ``{name: TensorData}`` (numpy views of the file, memory-mapped).
    Raises ``Llama2Error`` naming the file for anything that is not plain tensor data.
    """
    path = Path(path)
    fh = open_regular(path)
    try:
        magic = fh.read(4)
        if magic != b"PK\x03\x04":
            if magic[:1] == b"\x80":
                fh.seek(0)
                raise _scan_plain_pickle(path, fh.read(MAX_PICKLE_BYTES))
            raise Llama2Error(f"{path}: not a PyTorch checkpoint")
        fh.seek(0)
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
            raise Llama2Error(f"{path}: truncated or corrupt zip archive") from None
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pkls) != 1:
            raise Llama2Error(f"{path}: no data.pkl record: not a torch.save checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        pkl = _small_record(path, zf, pkls[0])
        reader = _StorageReader(path, zf, prefix, fh)
        _prescan(path, pkl)
        up = _SafeUnpickler(io.BytesIO(pkl), path, reader)
        try:
            obj = up.load()
        except _Refused as e:
            raise _refusal(path, str(e)) from None
        except Llama2Error:
            raise
        except Exception as e:
            raise Llama2Error(
                f"{path}: corrupt data.pkl ({type(e).__name__}: {str(e)[:80]})"
            ) from None
    finally:
        fh.close()  # the mmap keeps its own handle on the file
    if not isinstance(obj, dict):
        raise Llama2Error(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    # Some checkpoints wrap the state dict: {"model": {...}} or {"state_dict": {...}}.
    for wrapper in ("model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], dict) and not isinstance(
            obj[wrapper], TensorData
        ):
            obj = obj[wrapper]
            break
    out: dict[str, TensorData] = {}
    for k, v in obj.items():
        if not isinstance(v, TensorData) or not isinstance(v.array, np.ndarray):
            raise Llama2Error(
                f"{path}: entry {one_line(repr(k), 60)} is a {type(v).__name__}, not a tensor"
            )
        if str(k) in out:
            raise Llama2Error(f"{path}: tensor {one_line(str(k), 60)} appears twice")
        out[str(k)] = v
    reader.check_no_sharing(out)
    return out


def load_pth(path: str | os.PathLike) -> dict[str, mx.array]:
    """``read_pth`` materialised as MLX arrays (bfloat16 stays bfloat16)."""
    return {k: v.to_mx() for k, v in read_pth(path).items()}
