"""Tensor parallelism (Megatron-style) of the Llama 2 transformer over the ranks of an
``mlx.launch`` run, so that a model N times larger than one machine's memory runs.

Each weight is cut along the axis of Meta's own model-parallel shards (the weight
table's ``meta_axis``): q/k/v and gate/up by output rows (each rank holds
``n_heads / N`` query heads, ``n_kv_heads / N`` KV heads and ``hidden_dim / N`` FFN
units), o_proj and down_proj by input columns, followed by one ``all_sum`` each; the
embedding by columns and the LM head by vocabulary rows, followed by an ``all_gather``.
Norms are replicated. Each rank's KV cache holds its own KV heads only. Every rank
ends with the same logits, so sampling (seeded alike) agrees on every rank.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.distributed import World
from llama2_mlx.models.model import ModelArgs, Transformer


def check_tensor_parallel(args: ModelArgs, size: int) -> None:
    """Refuse a split that does not divide the model evenly (one line naming the size)."""
    for name, value in (("n_kv_heads", args.n_kv_heads), ("n_heads", args.n_heads),
                        ("hidden_dim", args.hidden_dim), ("vocab_size", args.vocab_size),
                        ("dim", args.dim)):
        if value % size:
            raise Llama2Error(
                f"tensor parallelism over {size} ranks needs {name} ({value}) divisible by "
                f"{size}; run on a number of ranks that divides it"
                + (" (each rank holds whole KV heads)" if name == "n_kv_heads" else ""))


def _gather_last(x: mx.array, group) -> mx.array:
    """(..., d) on each of N ranks -> (..., N * d), the ranks' pieces in rank order."""
    shape = x.shape
    g = mx.distributed.all_gather(x.reshape(-1, shape[-1]), group=group)  # (N * M, d)
    n = g.shape[0] // (x.size // shape[-1])
    g = g.reshape(n, -1, shape[-1]).transpose(1, 0, 2)
    return g.reshape(*shape[:-1], n * shape[-1])


class AllSumLinear(nn.Linear):
    """A linear layer holding some input columns: partial outputs summed over the ranks."""

    def __init__(self, input_dims: int, output_dims: int, group):
        super().__init__(input_dims, output_dims, bias=False)
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self._group)


class GatherLinear(nn.Linear):
    """A linear layer holding some output rows: the outputs gathered from the ranks."""

    def __init__(self, input_dims: int, output_dims: int, group):
        super().__init__(input_dims, output_dims, bias=False)
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_last(super().__call__(x), self._group)


class GatherEmbedding(nn.Embedding):
    """An embedding holding some columns of every row: the rows gathered from the ranks."""

    def __init__(self, num_embeddings: int, dims: int, group):
        super().__init__(num_embeddings, dims)
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_last(super().__call__(x), self._group)


def tensor_parallel_model(args: ModelArgs, world: World) -> Transformer:
    """A ``Transformer`` of ``args`` whose layers hold rank ``world.rank``'s slice of every
    weight (shapes as ``shard_shape`` gives; the values are to be loaded). Nothing is
    allocated until the weights are set: MLX arrays are lazy."""
    n, g = world.size, world.group
    check_tensor_parallel(args, n)
    model = Transformer(args)
    hd, dim = args.head_dim, args.dim
    model.model.embed_tokens = GatherEmbedding(args.vocab_size, dim // n, g)
    model.lm_head = GatherLinear(dim, args.vocab_size // n, g)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.n_heads, attn.n_kv_heads = args.n_heads // n, args.n_kv_heads // n
        attn.q_proj = nn.Linear(dim, attn.n_heads * hd, bias=False)
        attn.k_proj = nn.Linear(dim, attn.n_kv_heads * hd, bias=False)
        attn.v_proj = nn.Linear(dim, attn.n_kv_heads * hd, bias=False)
        attn.o_proj = AllSumLinear(attn.n_heads * hd, dim, g)
        mlp.gate_proj = nn.Linear(dim, args.hidden_dim // n, bias=False)
        mlp.up_proj = nn.Linear(dim, args.hidden_dim // n, bias=False)
        mlp.down_proj = AllSumLinear(args.hidden_dim // n, dim, g)
    return model


def shard_range(full: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of an axis of length ``full``."""
    return full * rank // size, full * (rank + 1) // size


def shard_shape(shape, axis: Optional[int], size: int) -> tuple[int, ...]:
    """The shape of one rank's slice of a weight of ``shape`` cut along ``axis``."""
    shape = list(shape)
    if axis is not None:
        shape[axis] //= size
    return tuple(shape)


def shard_weights(weights: dict, axes: dict, world: World) -> dict:
    """Rank ``world.rank``'s slices of full ``weights`` (name -> array), each cut along
    ``axes[name]`` (None: replicated)."""
    out = {}
    for k, w in weights.items():
        axis = axes.get(k)
        if axis is None:
            out[k] = w
            continue
        lo, hi = shard_range(w.shape[axis], world.rank, world.size)
        index = [slice(None)] * w.ndim
        index[axis] = slice(lo, hi)
        out[k] = mx.contiguous(w[tuple(index)])
    return out
