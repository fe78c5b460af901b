"""Type and range checks of a model's sizes (``ModelArgs``' fields), wherever they come
from: Meta's params.json, Hugging Face's config.json, a GGUF file or code.

Each field has a kind and bounds generous for any Llama (70B: dim 8192, 80 layers, 64
heads) yet small enough that a config cannot make the model's construction allocate
without end; a bool is not an int, a string is not a number, NaN and infinities are
refused. A message names the key as the file spells it (``keys``: field -> the file's
key, e.g. ``num_attention_heads`` for ``n_heads``) and says what is allowed.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from llama2_mlx.errors import one_line

# ModelArgs field -> the key of Hugging Face's config.json
HF_KEYS = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size",
    "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
    "max_seq_len": "max_position_embeddings",
}

# field -> (kind, low, high): ints in low..high; floats in (low, high], finite.
LIMITS: dict[str, tuple[type, float, float]] = {
    "dim": (int, 1, 1 << 17),
    "n_layers": (int, 1, 1 << 12),
    "n_heads": (int, 1, 1 << 12),
    "n_kv_heads": (int, 1, 1 << 12),
    "vocab_size": (int, 1, 1 << 24),
    "multiple_of": (int, 1, 1 << 20),
    "hidden_dim": (int, 1, 1 << 20),
    "max_seq_len": (int, 1, 1 << 24),
    "ffn_dim_multiplier": (float, 0.0, 64.0),
    "norm_eps": (float, 0.0, 1.0),
    "rope_theta": (float, 0.0, 1e12),
}


def _shown(value: Any) -> str:
    return one_line(repr(value), 40)


def check_value(field: str, value: Any, key: str = "") -> None:
    """Raise ``ValueError`` naming ``key`` (default: the field) unless ``value`` is of the
    field's kind and within its bounds."""
    key = key or field
    kind, low, high = LIMITS[field]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} = {_shown(value)}: must be an integer")
        if not low <= value <= high:
            raise ValueError(f"{key} = {_shown(value)}: must be from {low} to {high}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} = {_shown(value)}: must be a number")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or not low < v <= high:
        raise ValueError(f"{key} = {_shown(value)}: must be a finite number above {low:g} "
                         f"and at most {high:g}")


def check_fields(values: Mapping[str, Any], keys: Mapping[str, str] = {}) -> None:
    """Check every field in ``values`` (None: unset, allowed) and how they fit together:
    dim splits into n_heads heads of an even size (RoPE rotates pairs), and n_heads into
    groups of n_kv_heads. ``ValueError`` names the keys as ``keys`` spells them."""
    name = lambda f: keys.get(f, f)  # noqa: E731
    for field, value in values.items():
        if field in LIMITS and value is not None:
            check_value(field, value, name(field))
    dim, heads = values.get("dim"), values.get("n_heads")
    kv = values.get("n_kv_heads") or heads
    if dim is not None and heads is not None:
        if dim % heads:
            raise ValueError(f"{name('dim')} {dim} is not divisible by {name('n_heads')} {heads}")
        if (dim // heads) % 2:
            raise ValueError(f"{name('dim')} {dim} / {name('n_heads')} {heads} gives heads of "
                             f"odd size {dim // heads} (RoPE needs an even size)")
    if heads is not None and kv is not None and heads % kv:
        raise ValueError(
            f"{name('n_heads')} {heads} is not a multiple of {name('n_kv_heads')} {kv}"
        )


def check_hf_config(config: Mapping[str, Any]) -> None:
    """The config.json keys that are not ModelArgs fields but must agree with them."""
    head_dim = config.get("head_dim")
    if head_dim is not None:
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise ValueError(f"head_dim = {_shown(head_dim)}: must be an integer")
        dim, heads = config.get("hidden_size"), config.get("num_attention_heads")
        if isinstance(dim, int) and isinstance(heads, int) and head_dim * heads != dim:
            raise ValueError(f"head_dim {head_dim} != hidden_size {dim} / "
                             f"num_attention_heads {heads}")
