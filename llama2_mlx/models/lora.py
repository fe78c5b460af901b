"""LoRA adapters (Hu et al. 2021) on the model's linear layers, QLoRA included.

``y = W x + scale * (dropout(x) @ lora_a) @ lora_b`` with ``lora_a`` (in, r)
and ``lora_b`` (r, out), zero at the start so the adapted model starts out
equal to the base. Adapter folders are interchangeable with mlx-lm's:
``adapter_config.json`` (``fine_tune_type``, ``num_layers``,
``lora_parameters``) and ``adapters.safetensors`` keyed
``model.layers.{i}.self_attn.q_proj.lora_a`` ...
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from llama2_mlx.errors import Llama2Error, OptionError, check_fields
from llama2_mlx.formats.weights import check_dtypes, check_state_dict, parameter_shapes
from llama2_mlx.io.atomic import atomic_files, save_weights

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"

# Every attention and MLP projection of a block (mlx-lm's default for Llama).
DEFAULT_KEYS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def resolve_keys(keys) -> tuple[str, ...]:
    """Block-relative projection names for ``keys`` (names, or one comma-separated
    string): a short name means its projection (``q_proj`` is ``self_attn.q_proj``),
    ``attn``/``attention``, ``mlp`` and ``all`` their groups; other names stay as given."""
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",")]
    short = {k.rsplit(".", 1)[-1]: k for k in DEFAULT_KEYS}
    groups = {"all": DEFAULT_KEYS, "attn": DEFAULT_KEYS[:4], "attention": DEFAULT_KEYS[:4],
              "mlp": DEFAULT_KEYS[4:]}
    out: list[str] = []
    for k in keys:
        out += groups.get(k, (short.get(k, k),))
    return tuple(dict.fromkeys(out))


@dataclass
class LoRAConfig:
    """Rank, scale, dropout, the adapted projections (relative to a block; short names
    and groups as in ``resolve_keys``) and how many final blocks to adapt (-1: all).

    A field's ``help`` is its ``lora-train`` option's help text."""

    rank: int = field(default=8, metadata={"help": "LoRA rank.", "min": 1})
    scale: float = field(default=20.0, metadata={"help": "LoRA scale.", "min": -1e6, "max": 1e6})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout.", "min": 0, "below": 1})
    keys: tuple[str, ...] = field(default=DEFAULT_KEYS, metadata={
        "help": "Comma-separated projections to adapt: q_proj,v_proj..., attn, mlp or all "
                "(the default)."})
    num_layers: int = field(default=-1, metadata={"help": "Adapt the last N layers (-1: all).",
                                                  "min": -1})

    def __post_init__(self):
        self.keys = resolve_keys(self.keys)
        check_fields(self)  # the ranges in the fields' metadata
        if not self.keys:
            raise OptionError("{keys}: no projection to adapt")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` or ``nn.QuantizedLinear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits  # packed uint32 columns
        self.linear = base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        self.enabled = True  # False: the base layer alone (``disabled_adapters``)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if not getattr(self, "enabled", True):
            return y
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(x.dtype)

    def delta(self) -> mx.array:
        """The update to the (out, in) weight: scale * (lora_a @ lora_b)^T, in float32."""
        a, b = self.lora_a.astype(mx.float32), self.lora_b.astype(mx.float32)
        return self.scale * (a @ b).T

    def base_weight(self) -> mx.array:
        """The base layer's (out, in) weight (dequantized if quantized)."""
        lin = self.linear
        if isinstance(lin, nn.QuantizedLinear):
            return _dequantize(lin)
        return lin.weight


def _dequantize(m: nn.Module) -> mx.array:
    return mx.dequantize(
        m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits,
        mode=getattr(m, "mode", "affine"),
    )


def _adapted_count(num_layers: int, n: int) -> int:
    # mlx-lm: layers[-max(num_layers, 0):], so -1 and 0 both mean all layers.
    return n if num_layers <= 0 else num_layers


def _layer_range(model: nn.Module, num_layers: int) -> range:
    n = len(model.layers)
    if num_layers > n:
        raise OptionError("{num_layers} {got}: the model has only {n} layers", got=num_layers, n=n)
    return range(n - _adapted_count(num_layers, n), n)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze ``model`` and wrap ``config.keys`` of its final ``config.num_layers`` blocks
    in place with ``LoRALinear`` (only ``lora_a``/``lora_b`` stay trainable)."""
    model.freeze()
    for i in _layer_range(model, config.num_layers):
        block = model.layers[i]
        modules = dict(block.named_modules())
        wrapped = []
        for key in config.keys:
            base = modules.get(key)
            if base is None:
                raise OptionError("{keys}: no module '{key}' in model layer {i}", key=key, i=i)
            if isinstance(base, LoRALinear):
                raise OptionError("{keys}: '{key}' of layer {i} already has an adapter", key=key, i=i)
            if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
                raise OptionError("{keys}: '{key}' of layer {i} is not a linear layer", key=key, i=i)
            wrapped.append((key, LoRALinear(base, config.rank, config.scale, config.dropout)))
        block.update_modules(tree_unflatten(wrapped))
    return model


def twin(module: nn.Module) -> nn.Module:
    """A second module tree over the same weight arrays (nothing is copied).

    Adapters applied to, trained in or fused into the twin leave ``module`` as it
    is: MLX arrays are immutable, so training or fusing replaces the twin's entries
    and never writes into the shared ones. Used to give a policy and a reward model
    (or each rs-loop iteration's fresh policy) one copy of the frozen base in memory.
    """

    def copy(v):
        if isinstance(v, nn.Module):
            return twin(v)
        if isinstance(v, (list, tuple)):
            return type(v)(copy(x) for x in v)
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        return v  # arrays and plain values are shared

    new = module.__class__.__new__(module.__class__)
    # Attributes (frozen-key sets included) are per-module state: copy the containers.
    new.__dict__.update({k: set(v) if isinstance(v, set) else v for k, v in module.__dict__.items()})
    dict.update(new, {k: copy(v) for k, v in module.items()})
    return new


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRA layer in ``model``."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` computing its base alone inside the block: every LoRA layer returns its
    base layer's output (the update skipped, not zeroed), and is enabled again on exit,
    however the block ends. PPO's reference policy pi_0 is the policy so, on the same
    weights: no second copy of the model. The LoRA matrices themselves are untouched."""
    layers = [m for _, m in lora_layers(model)]
    before = [getattr(m, "enabled", True) for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.enabled = on


def train_lora_only(model: nn.Module) -> nn.Module:
    """Freeze ``model`` but the ``lora_a``/``lora_b`` of its LoRA layers (to train them further)."""
    model.freeze()
    for _, layer in lora_layers(model):
        layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return model


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA matrices under mlx-lm's key names."""
    return {
        k: v for k, v in tree_flatten(model.parameters())
        if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }


def adapter_config_dict(config: LoRAConfig, n_layers: int, **extra) -> dict:
    """The ``adapter_config.json`` mlx-lm reads (its keys first, our extra fields after)."""
    return {
        "fine_tune_type": "lora",
        "num_layers": _adapted_count(config.num_layers, n_layers),
        "lora_parameters": {
            "rank": config.rank, "scale": config.scale, "dropout": config.dropout,
            "keys": list(config.keys),
        },
        **extra,
    }


def save_adapters(model: nn.Module, adapter_path, config: LoRAConfig, **extra) -> Path:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` into ``adapter_path``,
    together or not at all (``atomic_files``: never a config of one step beside the
    weights of another). ``extra`` fields are stored in the config (mlx-lm ignores them)."""
    out = Path(adapter_path)
    weights = adapter_weights(model)
    if not weights:
        raise Llama2Error("save_adapters: the model has no LoRA layers")
    config_dict = adapter_config_dict(config, len(model.layers), **extra)
    with atomic_files(out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG) as (tmp_weights, tmp_config):
        save_weights(tmp_weights, weights)
        with open(tmp_config, "w") as f:
            json.dump(config_dict, f, indent=2)
            f.write("\n")
    return out


def read_adapter_config(adapter_path) -> tuple[str, LoRAConfig]:
    """(fine_tune_type, LoRAConfig) from an adapter folder written by us or mlx-lm."""
    from llama2_mlx.io.readers import exists, read_json

    path = Path(adapter_path) / ADAPTER_CONFIG
    if not exists(path):
        raise OptionError("{adapter_path}: {path} not found", path=path)
    cfg = read_json(path)
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "full"):
        raise Llama2Error(f"{path}: fine_tune_type '{kind}' is not supported (lora or full)")
    params = cfg.get("lora_parameters") or {}
    if not isinstance(params, dict):
        raise Llama2Error(f"{path}: lora_parameters is not an object")
    if kind == "lora" and "scale" not in params:
        raise Llama2Error(f"{path}: lora_parameters has no 'scale'")
    _check_adapter_fields(params, cfg, path)
    try:
        config = LoRAConfig(
            rank=int(params.get("rank", LoRAConfig.rank)),
            scale=float(params["scale"]) if kind == "lora" else 1.0,
            dropout=float(params.get("dropout", LoRAConfig.dropout)),
            keys=tuple(params.get("keys") or DEFAULT_KEYS),
            num_layers=int(cfg.get("num_layers", LoRAConfig.num_layers)),
        )
    except (TypeError, ValueError) as e:
        raise Llama2Error(f"{path}: bad lora_parameters ({e})") from None
    return kind, config


MAX_RANK = 1 << 14


def _check_adapter_fields(params: dict, cfg: dict, path: Path) -> None:
    """Types and ranges of an adapter_config.json, each error naming the key."""
    def bad(key, value, what):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise Llama2Error(f"{path}: {key} = {shown}: {what}")

    def number(v):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

    rank = params.get("rank", 8)
    if type(rank) is not int or not 1 <= rank <= MAX_RANK:
        bad("rank", rank, f"must be an integer from 1 to {MAX_RANK}")
    for key, low, high in (("scale", -1e6, 1e6), ("dropout", 0.0, 0.999999)):
        v = params.get(key, 0.0)
        if not number(v) or not low <= v <= high:
            bad(key, v, f"must be a number from {low:g} to {high:g}")
    keys = params.get("keys")
    if keys is not None and (not isinstance(keys, list) or len(keys) > 64 or not all(
            isinstance(k, str) and 0 < len(k) <= 200 for k in keys)):
        bad("keys", keys, "must be a list of projection names")
    n = cfg.get("num_layers", -1)
    if type(n) is not int or not -1 <= n <= 1 << 12:
        bad("num_layers", n, "must be -1 (all) or a number of layers")


def load_adapters(model: nn.Module, adapter_path) -> nn.Module:
    """Apply the adapters in folder ``adapter_path`` (ours or mlx-lm's) to ``model`` in place."""
    from llama2_mlx.formats.safetensors import read_safetensors, safetensors_header
    from llama2_mlx.io.readers import exists

    kind, config = read_adapter_config(adapter_path)
    wfile = Path(adapter_path) / ADAPTER_WEIGHTS
    if not exists(wfile):
        raise OptionError("{adapter_path}: {wfile} not found", wfile=wfile)
    declared = safetensors_header(wfile)  # shapes checked before any byte is read
    check_dtypes(declared, wfile)
    if kind == "lora":
        # mlx-lm adapts layers[-num_layers:], so a count above the depth means all layers.
        config.num_layers = min(config.num_layers, len(model.layers))
        apply_lora(model, config)
    if kind == "lora":  # exactly the LoRA matrices
        expected = {k: tuple(v.shape) for k, v in adapter_weights(model).items()}
        check_state_dict(declared, expected, wfile, what="this model's LoRA layers")
    else:  # a full fine-tune saves every parameter it trained, a subset of the model's
        check_state_dict(declared, parameter_shapes(model), wfile, partial=True)
    weights = read_safetensors(wfile)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model


def fuse_lora(model: nn.Module, dequantize: bool = False, requantize: bool = False) -> nn.Module:
    """Replace every LoRA layer of ``model`` with a plain linear holding ``W + delta``.

    Re-quantizing a fused layer at the base's bits loses most of a small update
    (it is below the quantization step), so by default the fused layers of a
    quantized base are kept unquantized (in the scales' dtype) while the other
    layers stay quantized. ``requantize`` re-quantizes them anyway (smaller, as
    mlx-lm does); ``dequantize`` dequantizes the whole model.
    """
    fused = []
    for name, layer in lora_layers(model):
        base = layer.linear
        quantized = isinstance(base, nn.QuantizedLinear)
        dtype = base.scales.dtype if quantized else base.weight.dtype
        w = (layer.base_weight().astype(mx.float32) + layer.delta()).astype(dtype)
        if quantized and requantize and not dequantize:
            new = nn.QuantizedLinear(w.shape[1], w.shape[0], bias=False,
                                     group_size=base.group_size, bits=base.bits)
            new.weight, new.scales, new.biases = mx.quantize(
                w, group_size=base.group_size, bits=base.bits)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias=False)
            new.weight = w
        if "bias" in base:
            new.bias = base.bias
        fused.append((name, new))
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
    model.unfreeze()
    mx.eval(model.parameters())
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear / embedding of ``model`` with its float version."""
    plain = []
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            w = _dequantize(m)
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            new.weight = w.astype(m.scales.dtype)
            if "bias" in m:
                new.bias = m.bias
            plain.append((name, new))
        elif isinstance(m, nn.QuantizedEmbedding):
            w = _dequantize(m)
            new = nn.Embedding(*w.shape)
            new.weight = w.astype(m.scales.dtype)
            plain.append((name, new))
    if plain:
        model.update_modules(tree_unflatten(plain))
    return model


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a quantized matrix counts its packed size)."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return trainable, total
