"""Load one rank's slice of a checkpoint for tensor-parallel generation
(``mlx.launch -n N -- llama2 generate --model M``; ``models.parallel``).

Every tensor is cut along its axis in the one weight table (``WEIGHTS.meta_axis``), and
only that slice is read: safetensors and ``.pth`` files are memory-mapped
(``formats.slices``), and Meta's model-parallel shards are sliced across (with N ranks
on N shards, rank r reads the tensor data of shard r only). Names and shapes are checked as ``load`` does.
Quantized checkpoints are refused (their packed columns would need cutting by groups).
"""

from __future__ import annotations

from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_unflatten

from llama2_mlx.chat.tokenizer import Tokenizer
from llama2_mlx.errors import Llama2Error
from llama2_mlx.formats.pth import TensorData, read_pth
from llama2_mlx.formats.slices import concat_slice, safetensors_views
from llama2_mlx.formats.weights import (
    IGNORED_HF_SUFFIXES,
    cast,
    check_state_dict,
    meta_to_hf_rows,
    parameter_shapes,
    parse_dtype,
    weight_table,
)
from llama2_mlx.io.distributed import World
from llama2_mlx.io.hub import PathLike, resolve
from llama2_mlx.io.readers import read_json
from llama2_mlx.models.model import ModelArgs, Transformer
from llama2_mlx.models.parallel import shard_range, tensor_parallel_model


def _hf_views(folder: Path) -> tuple[dict[str, list[TensorData]], dict, list[Path]]:
    config = read_json(folder / "config.json")
    if config.get("quantization") or config.get("quantization_config"):
        raise Llama2Error(f"{folder / 'config.json'}: a quantized checkpoint; tensor-parallel "
                          "generation needs a float one (each rank holds 1/N of it)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [folder / f for f in sorted(set((read_json(index).get("weight_map") or {})
                                                .values()))]
    else:
        files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    files = files or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise Llama2Error(f"{folder}: config.json but no *.safetensors weights")
    views: dict[str, list[TensorData]] = {}
    for f in files:
        if not f.is_file():
            raise Llama2Error(f"{folder}: {f.name} is missing")
        part = safetensors_views(f) if f.suffix == ".safetensors" else read_pth(f)
        for k, v in part.items():
            if k.endswith(IGNORED_HF_SUFFIXES):
                continue
            if k in views:
                raise Llama2Error(f"{f}: tensor {k} is also in another file")
            views[k] = [v]
    if "lm_head.weight" not in views and config.get("tie_word_embeddings"):
        views["lm_head.weight"] = views.get("model.embed_tokens.weight", [])
    return views, config, [folder / "tokenizer.model"]


def _meta_views(folder: Path) -> tuple[dict[str, list[TensorData]], dict, list[Path]]:
    params = read_json(folder / "params.json")
    shards = sorted(folder.glob("consolidated.*.pth"))
    opened = [read_pth(p) for p in shards]  # memory-mapped: nothing is read yet
    names = {n for shard in opened for n in shard}
    views = {n: [s[n] for s in opened if n in s] for n in names}
    if params.get("vocab_size", -1) in (-1, None) and "tok_embeddings.weight" in views:
        params = {**params, "vocab_size": views["tok_embeddings.weight"][0].shape[0]}
    return views, params, [folder / "tokenizer.model", folder.parent / "tokenizer.model"]


def load_tensor_parallel(path_or_repo: PathLike, world: World, *, dtype=None):
    """``(model, tokenizer)`` with rank ``world.rank``'s slice of every weight of the
    checkpoint (a Meta or Hugging Face folder, or a repo id)."""
    folder = resolve(path_or_repo)
    dtype = parse_dtype(dtype)
    meta = (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))
    if not meta and not (folder / "config.json").is_file():
        raise Llama2Error(f"{folder}: not a checkpoint folder (expected params.json + "
                          "consolidated.*.pth, or config.json + *.safetensors)")
    views, params, tokenizer_candidates = (_meta_views if meta else _hf_views)(folder)
    try:
        args = ModelArgs.from_dict(params)
    except (KeyError, TypeError, ValueError) as e:
        raise Llama2Error(f"{folder}: {e}") from None
    model = tensor_parallel_model(args, world)
    full = parameter_shapes(Transformer(args))  # lazy: the shapes only
    weights = {}
    for w in weight_table(args.n_layers):
        name = w.meta if meta else w.internal
        pieces = views.get(name)
        if not pieces:
            raise Llama2Error(f"{folder}: tensor {name} is missing")
        axis = w.spec.meta_axis
        shape = list(pieces[0].shape)
        if axis is not None and meta:
            shape[axis] = sum(p.shape[axis] for p in pieces)
        if tuple(shape) != full[w.internal]:
            raise Llama2Error(f"{folder}: tensor {name} has shape {tuple(shape)}, the model "
                              f"expects {full[w.internal]}")
        if axis is None:
            part = pieces[0]
        else:
            part = concat_slice(pieces, axis, *shard_range(shape[axis], world.rank, world.size))
        if meta and w.spec.rope_heads is not None:  # whole heads: permute within them
            heads = getattr(args, w.spec.rope_heads) // world.size
            part = TensorData(meta_to_hf_rows(part.array, heads), part.dtype)
        weights[w.internal] = cast(part.to_mx(), dtype)
        mx.eval(weights[w.internal])  # one slice at a time
    check_state_dict(weights, parameter_shapes(model), folder,
                     what=f"rank {world.rank}'s slice of the model")
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    tok_path = next((p for p in tokenizer_candidates if p.is_file()), None)
    if tok_path is None:
        raise Llama2Error(f"{folder}: no tokenizer.model")
    tokenizer = Tokenizer(tok_path)
    if tokenizer.vocab_size > args.vocab_size:
        raise Llama2Error(f"{tok_path}: the tokenizer has {tokenizer.vocab_size} pieces but "
                          f"the embedding only {args.vocab_size} rows")
    return model, tokenizer


def memory_per_rank(args: ModelArgs, size: int, bytes_per_weight: float) -> float:
    """Bytes of one rank's weights under tensor parallelism over ``size`` ranks (norms are
    replicated; everything else is cut in ``size``)."""
    shapes = parameter_shapes(Transformer(args))
    total = 0.0
    for w in weight_table(args.n_layers):
        n = 1
        for d in shapes[w.internal]:
            n *= d
        total += n / (1 if w.spec.meta_axis is None else size)
    return total * bytes_per_weight
