"""Llama 2 on MLX."""

# First of all, before anything imports mlx: an optimized BLAS for MLX's CPU
# matmuls on Linux (it only takes effect if loaded before mlx.core; see blas.py).
from . import blas as _blas

_blas.setup()

from .loader import convert, load, load_model, save_model  # noqa: E402
