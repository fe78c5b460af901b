"""Load Llama 2 checkpoints (Meta, Hugging Face, this project's own).

Three layouts are read:

* **Meta** (the original download): ``params.json`` + ``consolidated.NN.pth``
  (model-parallel shards, read with the safe reader in ``pth.py``) +
  ``tokenizer.model`` in the same folder or one up.
* **Hugging Face**: ``config.json`` + ``model.safetensors`` (or sharded
  ``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``) +
  ``tokenizer.model``.
* **This project's** (what ``convert`` / ``save_model`` in ``export.py`` write): the
  Hugging Face layout, plus mlx-lm's ``"quantization"`` entry in config.json when
  quantized, so that mlx-lm loads it too.

Every rename goes through one table, ``WEIGHTS``; the loaded key set and every
shape are checked against the model built from the config before any weight is
used, and each problem is one ``Llama2Error`` line naming the file and tensor.

Repo ids are resolved in ``hub.py``. ``resolve``, ``HUB_PATTERNS``, ``save_model``,
``quantize`` and ``convert`` are re-exported here, where callers have always imported
them from.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import Llama2Error
from .export import convert, quantize, save_model  # noqa: F401  (re-exported)
from .hub import HUB_PATTERNS, PathLike, _one_line, resolve  # noqa: F401  (some re-exported)
from .model import ModelArgs, Transformer
from .pth import TensorData, read_pth

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass(frozen=True)
class TensorSpec:
    """One weight: its internal (= Hugging Face) name, Meta's name, how Meta shards it."""

    internal: str  # "{i}" stands for the layer index
    meta: str
    meta_axis: Optional[int]  # concatenation axis of Meta's model-parallel shards; None: replicated
    rope_heads: Optional[str] = None  # ModelArgs field: permute rows interleaved -> rotate-half


_L = "model.layers.{i}."
WEIGHTS: tuple[TensorSpec, ...] = (
    TensorSpec("model.embed_tokens.weight", "tok_embeddings.weight", 1),
    TensorSpec(_L + "self_attn.q_proj.weight", "layers.{i}.attention.wq.weight", 0, "n_heads"),
    TensorSpec(_L + "self_attn.k_proj.weight", "layers.{i}.attention.wk.weight", 0, "n_kv_heads"),
    TensorSpec(_L + "self_attn.v_proj.weight", "layers.{i}.attention.wv.weight", 0),
    TensorSpec(_L + "self_attn.o_proj.weight", "layers.{i}.attention.wo.weight", 1),
    TensorSpec(_L + "mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight", 0),
    TensorSpec(_L + "mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight", 1),
    TensorSpec(_L + "mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight", 0),
    TensorSpec(_L + "input_layernorm.weight", "layers.{i}.attention_norm.weight", None),
    TensorSpec(_L + "post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight", None),
    TensorSpec("model.norm.weight", "norm.weight", None),
    TensorSpec("lm_head.weight", "output.weight", 0),
)
IGNORED_META = {"rope.freqs"}  # precomputed RoPE frequencies
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_table(args: ModelArgs) -> list[tuple[str, str, TensorSpec]]:
    """``(internal_name, meta_name, spec)`` for every weight of a model with ``args``."""
    out = []
    for spec in WEIGHTS:
        layers = range(args.n_layers) if "{i}" in spec.internal else [None]
        for i in layers:
            out.append((spec.internal.format(i=i), spec.meta.format(i=i), spec))
    return out


def meta_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute q/k rows from Meta's interleaved RoPE pairs to the rotate-half order.

    Per head, rows (0, 1), (2, 3), ... are pairs; rotate-half wants the first
    elements of all pairs, then the second ones (transformers' conversion script).
    """
    rows, cols = w.shape
    w = w.reshape(n_heads, rows // n_heads // 2, 2, cols)
    return w.transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_to_meta_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of ``meta_to_hf_rows``."""
    rows, cols = w.shape
    w = w.reshape(n_heads, 2, rows // n_heads // 2, cols)
    return w.transpose(0, 2, 1, 3).reshape(rows, cols)


# ----------------------------------------------------------------------------- helpers


def _dtype(dtype) -> Optional[mx.Dtype]:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    name = str(dtype).removeprefix("mlx.core.").removeprefix("mx.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise Llama2Error(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _cast(a: mx.array, dtype: Optional[mx.Dtype]) -> mx.array:
    if dtype is None or a.dtype == dtype or not mx.issubdtype(a.dtype, mx.floating):
        return a
    return a.astype(dtype)



def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise Llama2Error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise Llama2Error(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise Llama2Error(f"{path}: expected a JSON object")
    return data


def _args_from(params: dict, where: Path) -> ModelArgs:
    try:
        return ModelArgs.from_dict(params)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else _one_line(e)
        raise Llama2Error(f"{where}: {what}") from None


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _check_table(model: Transformer) -> None:
    """The table must name exactly the parameters of the (unquantized) model."""
    table = {internal for internal, _, _ in weight_table(model.args)}
    params = set(_expected_shapes(model))
    if table != params:  # a programming error, not bad input
        raise AssertionError(f"weight table out of date: {sorted(table ^ params)[:4]}")


def _check_weights(
    expected: dict[str, tuple], weights: dict[str, mx.array], sources: dict[str, Path],
    where: Path, config: Path,
) -> None:
    """Key set and shapes of ``weights`` against the model; one-line errors."""
    for name in expected:
        if name not in weights:
            raise Llama2Error(f"{where}: tensor {name} is missing")
    for name, a in weights.items():
        if name not in expected:
            raise Llama2Error(
                f"{sources.get(name, where)}: unexpected tensor {name} "
                f"(not part of a Llama 2 model as {config.name} describes it)"
            )
        if tuple(a.shape) != expected[name]:
            raise Llama2Error(
                f"{sources.get(name, where)}: tensor {name} has shape {tuple(a.shape)}, "
                f"expected {expected[name]} from {config.name}"
            )


@dataclass
class _Loaded:
    model: Transformer
    layout: str  # "meta" or "hf"
    folder: Path
    tokenizer_candidates: list[Path] = field(default_factory=list)
    embed_file: Optional[Path] = None  # the file holding the embedding (for vocab errors)
    embed_name: str = "model.embed_tokens.weight"

    @property
    def tokenizer(self) -> Optional[Path]:
        return next((p for p in self.tokenizer_candidates if p.is_file()), None)


# ----------------------------------------------------------------------------- Meta layout


def _meta_shards(folder: Path) -> list[Path]:
    shards = sorted(folder.glob("consolidated.*.pth"))
    want = [folder / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != want:
        names = ", ".join(p.name for p in shards)
        raise Llama2Error(
            f"{folder}: Meta shards must be consolidated.00.pth .. "
            f"consolidated.{len(shards) - 1:02d}.pth; found {names}"
        )
    return shards


def _load_meta(folder: Path, dtype: Optional[mx.Dtype]) -> _Loaded:
    params_file = folder / "params.json"
    params = _read_json(params_file)
    shard_files = _meta_shards(folder)
    shards = [read_pth(p) for p in shard_files]
    n = len(shards)

    emb = shards[0].get("tok_embeddings.weight")
    if emb is None:
        raise Llama2Error(f"{shard_files[0]}: tensor tok_embeddings.weight is missing")
    if params.get("vocab_size", -1) in (-1, None):  # Meta leaves it to the tokenizer
        params = {**params, "vocab_size": emb.shape[0]}
    args = _args_from(params, params_file)
    model = Transformer(args)
    _check_table(model)
    expected = _expected_shapes(model)

    table = weight_table(args)
    known = {meta for _, meta, _ in table} | IGNORED_META
    for file, shard in zip(shard_files, shards):
        for name in shard:
            if name not in known:
                raise Llama2Error(
                    f"{file}: unexpected tensor {name} (not part of a Llama 2 model as "
                    f"{params_file.name} describes it)"
                )

    weights: dict[str, mx.array] = {}
    for internal, meta, spec in table:
        full = expected[internal]
        part = list(full)
        if spec.meta_axis is not None:
            if full[spec.meta_axis] % n:
                raise Llama2Error(
                    f"{params_file}: {meta} of shape {full} cannot be split over {n} shards"
                )
            part[spec.meta_axis] //= n
        pieces: list[TensorData] = []
        for file, shard in zip(shard_files, shards):
            t = shard.get(meta)
            if t is None:
                raise Llama2Error(f"{file}: tensor {meta} is missing")
            if t.shape != tuple(part):
                raise Llama2Error(
                    f"{file}: tensor {meta} has shape {t.shape}, expected {tuple(part)} "
                    f"from {params_file.name}" + (f" and {n} shards" if n > 1 else "")
                )
            if pieces and t.dtype != pieces[0].dtype:
                raise Llama2Error(
                    f"{file}: tensor {meta} is {t.dtype}, but {pieces[0].dtype} in shard 00"
                )
            pieces.append(t)
        if spec.meta_axis is None or n == 1:
            arr = pieces[0].array
        else:
            arr = np.concatenate([p.array for p in pieces], axis=spec.meta_axis)
        if spec.rope_heads is not None:
            arr = meta_to_hf_rows(arr, getattr(args, spec.rope_heads))
        weights[internal] = _cast(TensorData(arr, pieces[0].dtype).to_mx(), dtype)
        mx.eval(weights[internal])  # one tensor at a time: no second copy of the model
        del arr, pieces

    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return _Loaded(
        model, "meta", folder,
        tokenizer_candidates=[folder / "tokenizer.model", folder.parent / "tokenizer.model"],
        embed_file=shard_files[0], embed_name="tok_embeddings.weight",
    )


# ----------------------------------------------------------------------------- HF layout


def _safetensors_header(path: Path) -> dict:
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


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    _safetensors_header(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError on malformed files
        raise Llama2Error(f"{path}: cannot read safetensors ({_one_line(e, 100)})") from None


def _hf_weight_files(folder: Path) -> tuple[list[Path], str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise Llama2Error(f"{index}: no weight_map")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise Llama2Error(f"{index}: lists {f.name}, which is missing")
        return files, "safetensors"
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if files:
        return files, "safetensors"
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:  # read with the safe reader; never unpickled by torch
        return bins, "pth"
    raise Llama2Error(f"{folder}: config.json but no *.safetensors weights")


def _quantize_layer(path: str, module: nn.Module, quant: dict, weights: dict):
    """As mlx-lm: a per-layer entry wins; else quantize the layers saved with scales."""
    if path in quant:
        return quant[path]
    return hasattr(module, "to_quantized") and f"{path}.scales" in weights


def _load_hf(folder: Path, dtype: Optional[mx.Dtype]) -> _Loaded:
    config_file = folder / "config.json"
    config = _read_json(config_file)
    if config.get("model_type", "llama") != "llama":
        raise Llama2Error(f"{config_file}: model_type {config['model_type']!r} is not Llama")
    if config.get("rope_scaling"):
        raise Llama2Error(f"{config_file}: rope_scaling is not supported (Llama 2 has none)")
    head_dim = config.get("head_dim")
    if head_dim and "hidden_size" in config and "num_attention_heads" in config:
        if head_dim * config["num_attention_heads"] != config["hidden_size"]:
            raise Llama2Error(f"{config_file}: head_dim {head_dim} != hidden_size / heads")
    quant = config.get("quantization")
    if quant is None and config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise Llama2Error(
            f"{config_file}: quantized with {method}, which is not supported; "
            "use a float checkpoint (and `llama2 convert -q` to quantize it)"
        )
    args = _args_from(config, config_file)

    files, kind = _hf_weight_files(folder)
    weights: dict[str, mx.array] = {}
    sources: dict[str, Path] = {}
    for f in files:
        if kind == "safetensors":
            part = _read_safetensors(f)
        else:
            part = {k: v.to_mx() for k, v in read_pth(f).items()}
        for k, v in part.items():
            if k.endswith(IGNORED_HF_SUFFIXES):
                continue
            if k in weights:
                raise Llama2Error(f"{f}: tensor {k} is also in {sources[k].name}")
            weights[k], sources[k] = v, f
    if "lm_head.weight" not in weights and config.get("tie_word_embeddings"):
        for k in [k for k in weights if k.startswith("model.embed_tokens.")]:
            weights["lm_head." + k.split(".", 2)[2]] = weights[k]

    model = Transformer(args)
    if quant is not None:
        try:
            nn.quantize(
                model, group_size=int(quant["group_size"]), bits=int(quant["bits"]),
                mode=quant.get("mode", "affine"),
                class_predicate=lambda p, m: _quantize_layer(p, m, quant, weights),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise Llama2Error(
                f"{config_file}: bad quantization entry ({_one_line(e, 80)})"
            ) from None
    where = files[0] if len(files) == 1 else folder
    _check_weights(_expected_shapes(model), weights, sources, where, config_file)
    model.update(tree_unflatten([(k, _cast(v, dtype)) for k, v in weights.items()]))
    mx.eval(model.parameters())
    return _Loaded(
        model, "hf", folder, tokenizer_candidates=[folder / "tokenizer.model"],
        embed_file=sources.get("model.embed_tokens.weight"),
    )


# ----------------------------------------------------------------------------- any layout


def _load_folder(folder: Path, dtype) -> _Loaded:
    dtype = _dtype(dtype)
    if (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth")):
        return _load_meta(folder, dtype)
    if (folder / "config.json").is_file():
        return _load_hf(folder, dtype)
    raise Llama2Error(
        f"{folder}: not a checkpoint folder (expected params.json + consolidated.*.pth, "
        "or config.json + *.safetensors)"
    )


# ----------------------------------------------------------------------------- public API


def load_model(path: PathLike, dtype=None) -> Transformer:
    """The model alone (no tokenizer needed) from a Meta, HF or converted folder or a repo id.

    ``dtype`` None keeps the checkpoint's (bf16 for Meta); else 'float32', 'bfloat16'
    or 'float16'.
    """
    return _load_folder(resolve(path), dtype).model


def load(path_or_repo: PathLike, *, dtype=None, adapter_path: Optional[PathLike] = None):
    """``(model, tokenizer)`` from a Meta, HF or converted folder, or a Hugging Face repo id.

    With ``adapter_path`` the LoRA adapters there are applied to the model. The
    embedding may have more rows than the tokenizer has pieces, not fewer.
    """
    folder = resolve(path_or_repo)
    loaded = _load_folder(folder, dtype)
    tok_path = loaded.tokenizer
    if tok_path is None:
        looked = " or ".join(str(p) for p in loaded.tokenizer_candidates)
        raise Llama2Error(f"{folder}: no tokenizer.model (looked for {looked})")
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer(tok_path)
    # Extra embedding rows (fine-tunes' added tokens, a vocab padded to 32064) are never
    # indexed by the tokenizer's ids; fewer rows than pieces would be out of range.
    rows = loaded.model.args.vocab_size
    if tokenizer.vocab_size > rows:
        raise Llama2Error(
            f"{tok_path}: the tokenizer has {tokenizer.vocab_size} pieces but tensor "
            f"{loaded.embed_name} in {loaded.embed_file} has only {rows} rows"
        )
    model = loaded.model
    if adapter_path is not None:
        from .lora import load_adapters

        out = load_adapters(model, adapter_path)
        model = out if out is not None else model
    return model, tokenizer
