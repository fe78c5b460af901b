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

Every rename goes through the one table, ``formats.weights.WEIGHTS``; the loaded key
set and every shape are checked (``check_state_dict``) against the model built from the
config before any weight is used, and each problem is one ``Llama2Error`` line naming the
file and tensor. Repo ids are resolved in ``io.hub``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from llama2_mlx.chat.tokenizer import Tokenizer
from llama2_mlx.errors import Llama2Error, one_line
from llama2_mlx.formats.pth import TensorData, read_pth
from llama2_mlx.formats.safetensors import read_safetensors, safetensors_header
from llama2_mlx.formats.weights import (
    IGNORED_HF_SUFFIXES,
    IGNORED_META,
    cast,
    check_dtypes,
    check_state_dict,
    expected_shapes,
    from_meta_rows,
    parameter_count,
    parameter_shapes,
    parse_dtype,
    weight_table,
)
from llama2_mlx.io.hub import PathLike, resolve
from llama2_mlx.io.readers import exists, file_in, inside, is_regular, read_json
from llama2_mlx.models.lora import load_adapters
from llama2_mlx.models.model import ModelArgs, Transformer


def _args_from(params: dict, where: Path) -> ModelArgs:
    try:
        return ModelArgs.from_dict(params)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else one_line(e)
        raise Llama2Error(f"{where}: {what}") from None


def _check_table(model: Transformer) -> None:
    """The table must name exactly the parameters of the (unquantized) model."""
    params, table = parameter_shapes(model), expected_shapes(model.args)
    if table != params:  # a programming error, not bad input
        raise AssertionError(f"weight table out of date: {sorted(set(table) ^ set(params))[:4]}")


def _check_declared(declared: dict, args: ModelArgs, config_file: Path, where, sources: dict,
                    what: str) -> None:
    """The tensors the files' headers declare (nothing read yet) against the model the
    config describes: names and shapes, so that no byte is allocated for a config the
    weights do not match (a huge config over tiny files, a lying header)."""
    try:
        check_state_dict(declared, expected_shapes(args), where, sources=sources, what=what)
    except Llama2Error as e:
        implied = parameter_count(args)
        held = sum(math.prod(t.shape) for t in declared.values())
        if implied == held:
            raise
        raise Llama2Error(
            f"{e} ({config_file.name} describes {implied:,} parameters, the weight files "
            f"hold {held:,})"
        ) from None


@dataclass
class Loaded:
    """A model read from a checkpoint folder, with where its tokenizer may be."""

    model: Transformer
    layout: str  # "meta" or "hf"
    folder: Path
    tokenizer_candidates: list[Path] = field(default_factory=list)
    embed_file: Optional[Path] = None  # the file holding the embedding (for vocab errors)
    embed_name: str = "model.embed_tokens.weight"

    @property
    def tokenizer(self) -> Optional[Path]:
        return next((p for p in self.tokenizer_candidates if is_regular(p)), None)


# ----------------------------------------------------------------------------- Meta layout


def _meta_shards(folder: Path) -> list[Path]:
    shards = sorted(folder.glob("consolidated.*.pth"))
    want = [folder / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != want:
        names = ", ".join(p.name for p in shards[:8])
        raise Llama2Error(
            f"{folder}: Meta shards must be consolidated.00.pth .. "
            f"consolidated.{len(shards) - 1:02d}.pth; found {names}"
        )
    return [inside(p, folder) for p in shards]


def _load_meta(folder: Path, dtype: Optional[mx.Dtype]) -> Loaded:
    params_file = folder / "params.json"
    params = read_json(params_file)
    shard_files = _meta_shards(folder)
    shards = [read_pth(p) for p in shard_files]  # views of the files: nothing read yet
    n = len(shards)

    emb = shards[0].get("tok_embeddings.weight")
    if emb is None:
        raise Llama2Error(f"{shard_files[0]}: tensor tok_embeddings.weight is missing")
    if len(emb.shape) != 2:
        raise Llama2Error(f"{shard_files[0]}: tensor tok_embeddings.weight has shape "
                          f"{emb.shape}, not (vocab, dim)")
    if params.get("vocab_size", -1) in (-1, None):  # Meta leaves it to the tokenizer
        params = {**params, "vocab_size": emb.shape[0]}
    args = _args_from(params, params_file)

    table = weight_table(args.n_layers)
    known = {w.meta for w in table} | IGNORED_META
    for file, shard in zip(shard_files, shards):
        for name in shard:
            if name not in known:
                raise Llama2Error(
                    f"{file}: unexpected tensor {name} (not part of a Llama 2 model as "
                    f"{params_file.name} describes it)"
                )

    # Every shape and dtype is checked against params.json before any tensor is read.
    expected = expected_shapes(args)
    implied, held = parameter_count(args), sum(
        t.array.size for shard in shards for k, t in shard.items() if k not in IGNORED_META)
    context = (f" ({params_file.name} describes {implied:,} parameters, the shards hold "
               f"{held:,})" if implied != held else "")
    plan = []
    for w in table:
        internal, meta, spec = w.internal, w.meta, w.spec
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
                raise Llama2Error(f"{file}: tensor {meta} is missing{context}")
            if t.shape != tuple(part):
                raise Llama2Error(
                    f"{file}: tensor {meta} has shape {t.shape}, expected {tuple(part)} "
                    f"from {params_file.name}" + (f" and {n} shards" if n > 1 else "") + context
                )
            check_dtypes({meta: t}, file)
            if pieces and t.dtype != pieces[0].dtype:
                raise Llama2Error(
                    f"{file}: tensor {meta} is {t.dtype}, but {pieces[0].dtype} in shard 00"
                )
            pieces.append(t)
        plan.append((w, pieces))

    model = Transformer(args)
    _check_table(model)
    weights: dict[str, mx.array] = {}
    for w, pieces in plan:
        spec = w.spec
        if spec.meta_axis is None or n == 1:
            arr = pieces[0].array
        else:
            arr = np.concatenate([p.array for p in pieces], axis=spec.meta_axis)
        arr = from_meta_rows(arr, spec, args)
        weights[w.internal] = cast(TensorData(arr, pieces[0].dtype).to_mx(), dtype)
        mx.eval(weights[w.internal])  # one tensor at a time: no second copy of the model
        del arr, pieces
    plan.clear()

    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return Loaded(
        model, "meta", folder,
        tokenizer_candidates=[folder / "tokenizer.model", folder.parent / "tokenizer.model"],
        embed_file=shard_files[0], embed_name="tok_embeddings.weight",
    )


# ----------------------------------------------------------------------------- HF layout


def _hf_weight_files(folder: Path) -> tuple[list[Path], str]:
    index = folder / "model.safetensors.index.json"
    if is_regular(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise Llama2Error(f"{index}: no weight_map")
        names = list(weight_map.values())
        for name in names:
            if not isinstance(name, str):
                raise Llama2Error(
                    f"{index}: weight_map value {one_line(repr(name), 40)} is not a file name"
                )
        files = [file_in(folder, f, f"{index}: weight_map") for f in sorted(set(names))]
        for f in files:
            if not exists(f):
                raise Llama2Error(f"{index}: lists {f.name}, which is missing")
        return files, "safetensors"
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if files:
        return [inside(f, folder) for f in files], "safetensors"
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:  # read with the safe reader; never unpickled by torch
        return [inside(f, folder) for f in bins], "pth"
    raise Llama2Error(f"{folder}: config.json but no *.safetensors weights")


def _quantize_layer(path: str, module: nn.Module, quant: dict, weights):
    """As mlx-lm: a per-layer entry wins; else quantize the layers saved with scales."""
    if path in quant:
        return quant[path]
    return hasattr(module, "to_quantized") and f"{path}.scales" in weights


def _quantization(config: dict, config_file: Path) -> Optional[dict]:
    """mlx-lm's ``quantization`` entry, checked (None: not quantized)."""
    quant = config.get("quantization")
    qc = config.get("quantization_config")
    if quant is None and qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise Llama2Error(
            f"{config_file}: quantization_config: quantized with {one_line(method, 40)}, which "
            "is not supported; "
            "use a float checkpoint (and `llama2 convert -q` to quantize it)"
        )
    if quant is None:
        return None
    ok = (isinstance(quant, dict) and quant.get("group_size") in (32, 64, 128)
          and quant.get("bits") in (2, 3, 4, 5, 6, 8)
          and isinstance(quant.get("mode", "affine"), str)
          and all(isinstance(v, (bool, dict)) for k, v in quant.items()
                  if k not in ("group_size", "bits", "mode")))
    if not ok:
        raise Llama2Error(
            f"{config_file}: bad quantization entry {one_line(repr(quant), 80)} "
            "(group_size 32, 64 or 128; bits 2, 3, 4, 5, 6 or 8)"
        )
    return quant


def _check_quantized_size(declared: dict, args: ModelArgs, bits: int, config_file: Path):
    """A quantized model holds at least ``bits`` per parameter: a config describing a far
    larger model than the files hold is refused before the model is built."""
    held = sum(t.nbytes for t in declared.values())
    least = parameter_count(args) * bits // 8
    if held < least:
        raise Llama2Error(
            f"{config_file}: describes {parameter_count(args):,} parameters, at least "
            f"{least:,} bytes at {bits} bits, but the weight files hold {held:,} bytes"
        )


def _hf_headers(files: list[Path], kind: str) -> tuple[dict, dict, dict]:
    """(name -> declared tensor, name -> file, file -> what to read it with) from the
    files' headers alone (``.bin`` files: memory-mapped views)."""
    declared: dict = {}
    sources: dict[str, Path] = {}
    opened: dict[Path, dict] = {}
    for f in files:
        part = safetensors_header(f) if kind == "safetensors" else read_pth(f)
        opened[f] = part
        for k, v in part.items():
            if k.endswith(IGNORED_HF_SUFFIXES):
                continue
            if k in declared:
                raise Llama2Error(f"{f}: tensor {k} is also in {sources[k].name}")
            declared[k], sources[k] = v, f
    return declared, sources, opened


def _load_hf(folder: Path, dtype: Optional[mx.Dtype]) -> Loaded:
    config_file = folder / "config.json"
    config = read_json(config_file)
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise Llama2Error(f"{config_file}: model_type {one_line(repr(model_type), 40)} is not Llama")
    if config.get("rope_scaling"):
        raise Llama2Error(f"{config_file}: rope_scaling is not supported (Llama 2 has none)")
    quant = _quantization(config, config_file)
    args = _args_from(config, config_file)

    files, kind = _hf_weight_files(folder)
    declared, sources, opened = _hf_headers(files, kind)
    tied = "lm_head.weight" not in declared and bool(config.get("tie_word_embeddings"))
    if tied and "model.embed_tokens.weight" in declared:
        declared["lm_head.weight"] = declared["model.embed_tokens.weight"]
        sources["lm_head.weight"] = sources["model.embed_tokens.weight"]
    where = files[0] if len(files) == 1 else folder
    what = f"a Llama 2 model as {config_file.name} describes it"
    check_dtypes(declared, where, sources=sources)

    if quant is None:
        _check_declared(declared, args, config_file, where, sources, what)
        model = Transformer(args)
        _check_table(model)
    else:
        _check_quantized_size(declared, args, quant["bits"], config_file)
        model = Transformer(args)
        try:
            nn.quantize(
                model, group_size=quant["group_size"], bits=quant["bits"],
                mode=quant.get("mode", "affine"),
                class_predicate=lambda p, m: _quantize_layer(p, m, quant, declared),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise Llama2Error(
                f"{config_file}: bad quantization entry ({one_line(e, 80)})"
            ) from None
        check_state_dict(declared, parameter_shapes(model), where, sources=sources, what=what)

    # Only now is a tensor byte read: each file's tensors, whose sizes are all checked.
    weights: dict[str, mx.array] = {}
    for f, part in opened.items():
        if kind == "safetensors":
            arrays = read_safetensors(f)
        else:
            arrays = {k: v.to_mx() for k, v in part.items()}
        for k, v in arrays.items():
            if k in declared:
                weights[k] = v
    opened.clear()
    if tied and "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.update(tree_unflatten([(k, cast(v, dtype)) for k, v in weights.items()]))
    mx.eval(model.parameters())
    return Loaded(
        model, "hf", folder, tokenizer_candidates=[folder / "tokenizer.model"],
        embed_file=sources.get("model.embed_tokens.weight"),
    )


# ----------------------------------------------------------------------------- any layout


def load_folder(folder: Path, dtype=None) -> Loaded:
    """The model in a local checkpoint folder of any layout (Meta, HF, ours)."""
    dtype = parse_dtype(dtype)
    if is_regular(folder / "params.json") and any(folder.glob("consolidated.*.pth")):
        return _load_meta(folder, dtype)
    if is_regular(folder / "config.json"):
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
    return load_folder(resolve(path), dtype).model


def load(path_or_repo: PathLike, *, dtype=None, adapter_path: Optional[PathLike] = None):
    """``(model, tokenizer)`` from a Meta, HF or converted folder, or a Hugging Face repo id.

    With ``adapter_path`` the LoRA adapters there are applied to the model. The
    embedding may have more rows than the tokenizer has pieces, not fewer.
    """
    folder = resolve(path_or_repo)
    loaded = load_folder(folder, dtype)
    tok_path = loaded.tokenizer
    if tok_path is None:
        looked = " or ".join(str(p) for p in loaded.tokenizer_candidates)
        raise Llama2Error(f"{folder}: no tokenizer.model (looked for {looked})")
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
        out = load_adapters(model, adapter_path)
        model = out if out is not None else model
    return model, tokenizer
