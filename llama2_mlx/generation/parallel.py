"""Generation on several ranks with the model cut across them (``mlx.launch -n N --
llama2 generate``): each rank loads its slice (``checkpoints.sharded``), every rank runs
the same decoding loop on the same (gathered) logits, and rank 0 prints.

Every token waits on all the ranks (the collectives of each layer), so the stream of
tokens is watched: a rank whose peers stop answering for longer than the distributed
time limit ends with one line, as in training.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Iterator, TypeVar

from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.distributed import World

T = TypeVar("T")


def load_for_generation(model, world: World, *, dtype=None, adapter_path=None):
    """``(model, tokenizer)``: rank ``world.rank``'s slice of ``model`` (a folder or repo id)."""
    from llama2_mlx.checkpoints.sharded import load_tensor_parallel

    if adapter_path is not None:
        raise Llama2Error("--adapter-path with tensor-parallel generation: fuse the adapters "
                          "into the model first (llama2 fuse)")
    return load_tensor_parallel(model, world, dtype=dtype)


def agreed(config, world: World):
    """``config`` with a seed every rank shares (rank 0 draws one when none is given):
    all ranks must sample the same tokens."""
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
    return dataclasses.replace(config, seed=world.broadcast_object(seed, "agreeing on a seed"))


def watched(steps: Iterable[T], world: World, what: str = "generating") -> Iterator[T]:
    """The items of ``steps``, each computed under the watchdog."""
    it = iter(steps)
    n = 0
    while True:
        with world.watch(f"{what} (token {n + 1})"):
            try:
                item = next(it)
            except StopIteration:
                return
        n += 1
        yield item
