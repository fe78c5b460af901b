"""Write models in this project's format: ``save_model``, ``quantize`` and ``convert``.

The format is the Hugging Face layout (config.json, model.safetensors, sharded above
``MAX_SHARD_BYTES`` with model.safetensors.index.json, tokenizer.model) plus mlx-lm's
``"quantization"`` entry in config.json when quantized, so that mlx-lm loads it too.
Reading any layout is ``load.py``'s job; the weight table is ``formats.weights``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from llama2_mlx.chat.tokenizer import CHAT_TEMPLATE
from llama2_mlx.checkpoints.load import load_folder
from llama2_mlx.errors import Llama2Error, OptionError, one_line
from llama2_mlx.io.atomic import atomic_dir, save_weights
from llama2_mlx.io.hub import PathLike, resolve
from llama2_mlx.io.readers import exists, is_dir, is_regular
from llama2_mlx.models.model import Transformer

MAX_SHARD_BYTES = 5 << 30  # split saved weights into files of at most ~5 GB
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)


def _quantization_of(model: nn.Module) -> Optional[dict]:
    found = set()
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            found.add((m.group_size, m.bits, getattr(m, "mode", "affine")))
    if not found:
        return None
    if len(found) > 1:
        raise Llama2Error(f"mixed quantization {sorted(found)} cannot be saved")
    gs, bits, mode = found.pop()
    return {"group_size": gs, "bits": bits, "mode": mode}


def _shards(weights: dict[str, mx.array], limit: int) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for k, v in weights.items():
        if shards[-1] and size + v.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards


def _dtype_name(weights: dict[str, mx.array]) -> str:
    for k in ("model.norm.weight", "lm_head.scales", "lm_head.weight"):
        if k in weights and mx.issubdtype(weights[k].dtype, mx.floating):
            return str(weights[k].dtype).split(".")[-1]
    return "float32"


def _hf_tokenizer_config(tokenizer_path: Path) -> dict:
    """What transformers (hence mlx-lm) needs to read tokenizer.model as Llama 2 does: BOS on,
    SentencePiece's leading space kept ("legacy"), and Meta's chat format as a template."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    except Exception as e:
        raise Llama2Error(
            f"{tokenizer_path}: not a SentencePiece model ({one_line(e, 80)})"
        ) from None
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "legacy": True,
        "chat_template": CHAT_TEMPLATE,
    }


def save_model(
    model: Transformer, out_dir: PathLike, tokenizer_path: Optional[PathLike] = None, *,
    quantization: Optional[dict] = None,
) -> Path:
    """Write ``model`` in this project's format (= HF layout, loadable by mlx-lm too).

    config.json (``ModelArgs.to_hf_config()``, plus ``"quantization"`` as mlx-lm writes
    it when the model is quantized), model.safetensors (sharded above ~5 GB) and a copy
    of ``tokenizer_path`` (plus a tokenizer_config.json for transformers). Written to a
    temporary folder beside ``out_dir``, then renamed into place; an existing ``out_dir``
    is replaced only if it is empty or a model folder. Returns the folder.
    """
    out = Path(out_dir).expanduser().absolute()
    if exists(out):
        if not is_dir(out):
            raise Llama2Error(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise Llama2Error(f"{out}: not empty and not a model folder; refusing to overwrite it")
    if tokenizer_path is not None and not is_regular(tokenizer_path):
        raise Llama2Error(f"{tokenizer_path}: tokenizer model not found")
    found = _quantization_of(model)
    if quantization and not found:
        raise Llama2Error("save_model: quantization given, but the model has no quantized layers")
    quantization = quantization or found

    with atomic_dir(out) as tmp:
        weights = dict(tree_flatten(model.parameters()))
        config = model.args.to_hf_config()
        config["torch_dtype"] = _dtype_name(weights)
        if quantization:
            q = {"group_size": int(quantization["group_size"]), "bits": int(quantization["bits"]),
                 "mode": quantization.get("mode", "affine")}
            config["quantization"] = q
            config["quantization_config"] = dict(q)  # mlx-lm writes both
        shards = _shards(weights, MAX_SHARD_BYTES)
        meta = {"format": "mlx"}
        if len(shards) == 1:
            save_weights(tmp / "model.safetensors", shards[0], metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_weights(tmp / name, shard, metadata=meta)
                weight_map.update({k: name for k in shard})
            index = {
                "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(_hf_tokenizer_config(Path(tokenizer_path)), indent=2) + "\n"
            )
    return out


def quantize(model: Transformer, bits: int = 4, group_size: int = 64) -> dict:
    """Quantize the Linear and Embedding layers in place (as mlx-lm does); returns the config.

    Layers whose input size is not a multiple of ``group_size`` stay unquantized.
    """
    if bits not in Q_BITS:
        raise OptionError("{q_bits} {bits}: use one of {choices}",
                          bits=bits, choices=', '.join(map(str, Q_BITS)))
    if group_size not in Q_GROUP_SIZES:
        raise OptionError("{q_group_size} {got}: use one of {choices}",
                          got=group_size, choices=", ".join(map(str, Q_GROUP_SIZES)))
    if _quantization_of(model) is not None:
        raise Llama2Error("the model is already quantized")
    nn.quantize(
        model, group_size=group_size, bits=bits,
        class_predicate=lambda p, m: hasattr(m, "to_quantized")
        and m.weight.shape[-1] % group_size == 0,
    )
    mx.eval(model.parameters())
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def convert(
    src: PathLike, out: PathLike, dtype=None, q_bits: Optional[int] = None,
    q_group_size: int = 64,
) -> Path:
    """Meta / HF / converted checkpoint (folder or repo id) -> this project's format in ``out``.

    ``dtype`` casts the weights first; ``q_bits`` quantizes them (group size ``q_group_size``).
    """
    loaded = load_folder(resolve(src), dtype)
    quant = None
    if q_bits is not None:
        quant = quantize(loaded.model, q_bits, q_group_size)
    return save_model(loaded.model, out, loaded.tokenizer, quantization=quant)
