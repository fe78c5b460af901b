"""An optimized BLAS under MLX's CPU matmuls on Linux.

The ``mlx[cpu]`` wheel for Linux links ``libmlx.so`` against a bundled reference
(Netlib) BLAS: a 1024x1024 float32 matmul runs at a few GFLOP/s. ``libmlx.so``
binds ``cblas_sgemm`` when ``mlx.core`` is imported (CPython dlopens extensions
with RTLD_NOW), and the dynamic linker searches the process's global scope
before the library's own dependencies. So a CBLAS library loaded with
RTLD_GLOBAL *before* that import wins: with Debian's OpenBLAS
(``apt-get install libopenblas0-pthread``) the same matmul is an order of
magnitude faster. OpenBLAS also carries LAPACK, so MLX's ``linalg`` calls bind
to it too.

``setup()`` does that once; ``llama2_mlx/__init__.py`` and the CLI call it
before anything imports mlx. ``LLAMA2_MLX_BLAS`` chooses: unset (search the
usual system locations), ``off`` / ``0`` / ``none`` (keep the bundled BLAS) or a
library path. ``describe()`` says which BLAS MLX's ``cblas_sgemm`` actually
resolves into, read from ``libmlx.so``'s own relocation slot, not guessed.

This module imports no mlx at import time (only ``environment()`` does, when
called), so that importing it cannot defeat its own purpose. Nothing is done
outside Linux: on macOS MLX uses Accelerate (and Metal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import struct
import sys
from dataclasses import dataclass
from typing import Optional

ENV = "LLAMA2_MLX_BLAS"
OFF_VALUES = ("off", "0", "none")
REFERENCE = "reference BLAS bundled with mlx"
ACCELERATE = "Accelerate (macOS)"
GPU = "GPU backend"
SYMBOL = "cblas_sgemm"  # the plain CBLAS name MLX calls (no 64_ / scipy_ decoration)
INSTALL_HINT = "apt-get install libopenblas0-pthread"

# Searched in order when LLAMA2_MLX_BLAS is unset. libopenblas before Debian's
# libblas.so.3: the latter is a thin forwarding layer over the former, so the
# check in describe() would then name the wrapper rather than OpenBLAS. The
# 64-bit-integer builds (openblas64*, libopenblas64*) are left out on purpose:
# MLX passes 32-bit ints, which an ILP64 library would misread.
_DEBIAN_DIRS = [f"/usr/lib/{arch}-linux-gnu/openblas-{flavour}"
                for arch in ("x86_64", "aarch64") for flavour in ("pthread", "openmp", "serial")]
_CANDIDATES = (
    [f"{d}/libopenblas.so.0" for d in _DEBIAN_DIRS]
    + [f"{d}/libblas.so.3" for d in _DEBIAN_DIRS]
    + [f"/usr/lib/{arch}-linux-gnu/libopenblas.so.0" for arch in ("x86_64", "aarch64")]
)
_FEDORA_GLOBS = ("/usr/lib64/libopenblasp.so*", "/usr/lib64/libopenblas.so*", "/usr/lib64/libopenblaso.so*")


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU matmuls use, as far as this process can tell.

    ``verified`` means ``libmlx.so``'s ``cblas_sgemm`` slot was read and found to
    point into ``path``; ``note`` says how that BLAS was chosen or why it could
    not be checked (one line).
    """

    name: str
    path: Optional[str]
    verified: bool
    note: str

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path else ""
        check = "verified" if self.verified else "not verified"
        return f"{self.name}{where}; {check}; {self.note}" if self.note else f"{self.name}{where}; {check}"


@dataclass(frozen=True)
class _Setup:
    requested: Optional[str]  # LLAMA2_MLX_BLAS as given (None: unset)
    loaded: Optional[str]     # the library loaded RTLD_GLOBAL, if any
    note: str                 # why this outcome, one line


_state: Optional[_Setup] = None


def _warn(message: str) -> None:
    print(f"llama2-mlx: warning: {message}", file=sys.stderr, flush=True)


def _openblas_config(lib: ctypes.CDLL) -> Optional[str]:
    """OpenBLAS's build string ("OpenBLAS 0.3.21 DYNAMIC_ARCH ... Haswell ..."), None if not OpenBLAS."""
    try:
        fn = lib.openblas_get_config
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    return (fn() or b"").decode(errors="replace").strip() or "OpenBLAS"


def _try_load(path: str) -> tuple[Optional[str], str]:
    """Load ``path`` with RTLD_GLOBAL if it is a usable CBLAS: (the loaded file, "") or
    (None, a one-line reason)."""
    try:
        # Opened locally first, so that a library we reject never enters the
        # global scope (where its symbols would shadow the bundled BLAS).
        lib = ctypes.CDLL(path)
    except OSError as e:
        message = (str(e).splitlines() or ["dlopen failed"])[0]  # dlopen's message usually names the file
        return None, f"cannot load {message if message.startswith(path) else f'{path}: {message}'}"
    if not hasattr(lib, SYMBOL):
        return None, f"{path} does not export {SYMBOL} (not a CBLAS library with plain names)"
    config = _openblas_config(lib)
    if config and "USE64BITINT" in config:
        return None, f"{path} is a 64-bit-integer (ILP64) OpenBLAS; MLX calls BLAS with 32-bit ints"
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # promotes the open library to the global scope
    except OSError as e:  # not expected once the local open worked
        return None, f"cannot load {path} globally: {e}"
    # The file that holds the symbol, so that a bare soname or a symlink compares
    # equal with what describe() finds later.
    return _file_of(ctypes.cast(getattr(lib, SYMBOL), ctypes.c_void_p).value) or path, ""


def _candidates():
    """Existing OpenBLAS files in the usual Debian/Ubuntu and Fedora places, in order,
    then the name ``ctypes.util.find_library`` gives (the loader's cache)."""
    for path in _CANDIDATES:
        if os.path.exists(path):
            yield path
    for pattern in _FEDORA_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if "64" not in os.path.basename(path):  # no ILP64 builds (libopenblas64*.so)
                yield path
    name = ctypes.util.find_library("openblas")
    if name:
        yield name


def find_openblas() -> Optional[str]:
    """The OpenBLAS that ``setup()`` would try first (a path, or a library name the loader
    finds), without loading it; None when there is none."""
    return next(_candidates(), None)


def setup() -> Optional[str]:
    """Load an optimized CBLAS for MLX, once, before ``mlx.core`` is imported (Linux only).

    Reads ``LLAMA2_MLX_BLAS``: unset searches the system (``find_openblas``);
    ``off`` / ``0`` / ``none`` keeps MLX's bundled reference BLAS; anything else is
    a library path or name. An explicit library that cannot be used, or an
    explicit request after mlx was already imported, is one warning line on
    stderr; the default search stays silent. Returns the loaded library's path,
    or None. Later calls return the first call's outcome.
    """
    global _state
    if _state is not None:
        return _state.loaded
    raw = os.environ.get(ENV, "").strip()
    requested = raw or None
    if not sys.platform.startswith("linux"):
        _state = _Setup(requested, None, f"not Linux ({sys.platform}): MLX's own BLAS is kept")
    elif requested and requested.lower() in OFF_VALUES:
        _state = _Setup(requested, None, f"{ENV}={requested}")
    elif "mlx.core" in sys.modules:
        # libmlx.so has already bound cblas_sgemm (RTLD_NOW): loading now changes nothing.
        note = "too late: mlx.core was imported before llama2_mlx, so MLX keeps the BLAS it bound"
        if requested:
            _warn(f"{ENV}={requested}: {note}")
        _state = _Setup(requested, None, note)
    elif requested:
        loaded, reason = _try_load(requested)
        if not loaded:
            _warn(f"{ENV}: {reason}; MLX keeps its bundled reference BLAS")
        _state = _Setup(requested, loaded, f"{ENV}={requested}" if loaded else reason)
    else:
        _state = _Setup(None, None, f"no OpenBLAS found ({INSTALL_HINT})")
        for path in _candidates():  # the first that loads; the default stays silent on failures
            loaded, reason = _try_load(path)
            _state = _Setup(None, loaded, "found by search" if loaded else reason)
            if loaded:
                break
    return _state.loaded


# --- where libmlx.so's cblas_sgemm points -------------------------------------------------

class _LinkMap(ctypes.Structure):
    pass


# The public head of glibc's struct link_map (<link.h>): stable ABI.
_LinkMap._fields_ = [("l_addr", ctypes.c_size_t), ("l_name", ctypes.c_char_p),
                     ("l_ld", ctypes.c_void_p), ("l_next", ctypes.POINTER(_LinkMap)),
                     ("l_prev", ctypes.POINTER(_LinkMap))]


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


_RTLD_DI_LINKMAP = 2
# Relocation types whose slot holds the symbol's absolute address once bound:
# x86-64 GLOB_DAT, JUMP_SLOT, 64; aarch64 GLOB_DAT, JUMP_SLOT, ABS64.
_SLOT_RELOCS = {62: (6, 7, 1), 183: (1025, 1026, 257)}


def _libdl() -> ctypes.CDLL:
    """The library that has dlinfo/dladdr: libc since glibc 2.34, libdl before."""
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "dlinfo") else ctypes.CDLL("libdl.so.2")


def _file_of(address: Optional[int]) -> Optional[str]:
    """The loaded object (file path) that contains ``address``, per dladdr; None if unknown."""
    info = _DlInfo()
    try:
        if not address or not _libdl().dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
            return None
    except (OSError, AttributeError):
        return None
    return os.path.normpath(info.dli_fname.decode(errors="replace")) if info.dli_fname else None


def _loaded_objects() -> list[tuple[str, int]]:
    """(path, load bias) of every object loaded in this process, from the dynamic linker's list."""
    dl = _libdl()
    head = ctypes.POINTER(_LinkMap)()
    if dl.dlinfo(ctypes.c_void_p(ctypes.CDLL(None)._handle), _RTLD_DI_LINKMAP, ctypes.byref(head)) != 0:
        raise OSError("dlinfo failed")
    out, node = [], head
    while node:
        out.append(((node.contents.l_name or b"").decode(errors="replace"), node.contents.l_addr))
        node = node.contents.l_next
    return out


def _slot_offsets(path: str, symbol: str) -> list[int]:
    """Offsets (from the load bias) of the relocation slots that hold ``symbol``'s address
    in the ELF64 little-endian shared object ``path``; [] if it has none."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return []
        machine, = struct.unpack_from("<H", head, 18)
        shoff, = struct.unpack_from("<Q", head, 40)
        shentsize, shnum = struct.unpack_from("<HH", head, 58)
        f.seek(shoff)
        table = f.read(shentsize * shnum)

        def section(i):  # (type, offset, size, link, entsize)
            _, typ, _, _, off, size, link, _, _, ent = struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize)
            return typ, off, size, link, ent

        def read(off, size):
            f.seek(off)
            return f.read(size)

        sections = [section(i) for i in range(shnum)]
        dynsym = next((i for i, s in enumerate(sections) if s[0] == 11), None)  # SHT_DYNSYM
        if dynsym is None or not sections[dynsym][4]:
            return []
        _, off, size, strtab, ent = sections[dynsym]
        syms = read(off, size)
        _, soff, ssize, _, _ = sections[strtab]
        names = read(soff, ssize)
        want = symbol.encode() + b"\0"
        index = set()  # the symbol-table entries named `symbol` (usually one)
        for i in range(size // ent):
            name_at, = struct.unpack_from("<I", syms, i * ent)
            if names[name_at:name_at + len(want)] == want:
                index.add(i)
        types = _SLOT_RELOCS.get(machine, ())
        slots = []
        for typ, off, size, link, ent in sections:
            if typ != 4 or link != dynsym or not ent:  # SHT_RELA against .dynsym
                continue
            for r_offset, r_info, addend in struct.iter_unpack("<QQq", read(off, size)):
                if r_info >> 32 in index and r_info & 0xFFFFFFFF in types and addend == 0:
                    slots.append(r_offset)
        return slots


def _mlx_dir() -> str:
    """The folder of the imported mlx package (libmlx.so is in its lib/), "/" if unknown."""
    path = os.path.realpath(getattr(sys.modules.get("mlx.core"), "__file__", None) or "/")
    while os.path.basename(path) != "mlx" and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def resolved_sgemm() -> tuple[Optional[str], str]:
    """The file MLX's bound ``cblas_sgemm`` lives in, read from the relocation slot of the
    loaded mlx library that calls it: (path, "") or (None, why it could not be told)."""
    core = sys.modules.get("mlx.core")
    if core is None:
        return None, "mlx is not imported yet"
    if not sys.platform.startswith("linux"):
        return None, "the check reads ELF relocations (Linux only)"
    mlx_dir = _mlx_dir()
    try:
        for path, bias in _loaded_objects():
            # libmlx.so (wheel) or the extension itself (a static build).
            if not path or not os.path.realpath(path).startswith(mlx_dir + os.sep):
                continue
            for offset in _slot_offsets(path, SYMBOL):
                where = _file_of(ctypes.c_void_p.from_address(bias + offset).value)
                if where is None:
                    return None, f"{SYMBOL} in {path} is not bound"
                if os.path.realpath(where) == os.path.realpath(path):
                    return None, f"{SYMBOL} in {path} is not bound yet (lazy binding)"
                return where, ""
    except (OSError, AttributeError, ValueError, struct.error) as e:
        return None, f"could not read the binding: {e}"
    return None, f"no loaded mlx library under {mlx_dir} imports {SYMBOL}"


def _name_of(path: str) -> str:
    """A human name for the (already loaded) BLAS library ``path``."""
    try:
        config = _openblas_config(ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY))
    except OSError:
        config = None
    if config:
        return config
    # The wheel's own copy sits beside mlx (site-packages/mlx_cpu.libs/libblas-<hash>.so.3...).
    site = os.path.dirname(_mlx_dir())
    real = os.path.realpath(path)
    if real.startswith(site + os.sep) and os.path.basename(real).startswith("libblas"):
        return REFERENCE
    return os.path.basename(path)


def describe() -> BlasInfo:
    """Which BLAS MLX's CPU matmuls use in this process, checked when mlx is imported.

    On Linux the answer comes from ``libmlx.so``'s ``cblas_sgemm`` relocation slot
    (so a library loaded too late, or an ``LD_PRELOAD``, is reported as what it is);
    with a GPU default device the BLAS only serves CPU-stream ops. On macOS MLX uses
    Accelerate and nothing is checked.
    """
    if sys.platform == "darwin":
        return BlasInfo(ACCELERATE, None, False, "MLX on macOS uses Accelerate (and Metal); nothing loaded")
    state = _state or _Setup(os.environ.get(ENV), None, "setup() was not called")
    if not sys.platform.startswith("linux"):
        return BlasInfo("MLX's own BLAS", None, False, state.note)
    path, why = resolved_sgemm()
    if path is None:
        name = _name_of(state.loaded) if state.loaded else REFERENCE
        return BlasInfo(name, state.loaded, False, f"{state.note}; {why}")
    loaded = state.loaded and os.path.realpath(path) == os.path.realpath(state.loaded)
    note = state.note if loaded or not state.loaded else f"{state.note}, but MLX binds another library"
    cpu = BlasInfo(_name_of(path), path, True, note)
    device = sys.modules["mlx.core"].default_device()
    if "gpu" in str(device).lower():
        return BlasInfo(GPU, path, True, f"default device {device}; CPU-stream ops: {cpu.name}; {note}")
    return cpu


def environment() -> dict[str, str]:
    """Versions and the compute set-up for ``llama2 env``: llama2-mlx, Python, mlx, the
    default device and the BLAS in use (imports mlx, after ``setup()`` has run)."""
    from importlib import metadata

    setup()
    import mlx.core as mx  # the one place this module imports mlx: at call time, after setup()

    try:
        version = metadata.version("llama2-mlx")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    return {
        "llama2-mlx": version,
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "BLAS": str(describe()),
    }
