"""Llama 2 on MLX."""

from .loader import convert, load, load_model, save_model
