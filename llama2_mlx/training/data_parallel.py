"""Data-parallel training on several processes (``mlx.launch -n N -- llama2 lora-train ...``).

The run is defined by its global batches, never by the number of processes: step ``s``
takes the same micro-batches, in the same order, as on one process. The units of a
step (the rows of its micro-batches when the data can rebuild a batch from some of its
rows, else whole micro-batches) are laid end to end and cut into ``size`` contiguous
shares; rank ``r`` takes share ``r``, kept cut at the micro-batch boundaries, so no
local batch is larger than a micro-batch (``step_pieces``). Each rank sums the
gradients and losses of its token losses (the loss functions return sums and counts),
the sums and counts are added across the ranks (``sum_step``) and divided once: the
step equals the one-process step, gradient accumulation included. A rank with no rows
in a step adds zeros and still takes part in the sum.

Dropout masks are drawn per local batch, so with dropout > 0 a run repeats itself on
the same number of processes only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_map

from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.distributed import World


def step_pieces(sizes: Sequence[int], rank: int, size: int) -> list[tuple[int, int, int]]:
    """Rank ``rank``'s share of a step whose micro-batches hold ``sizes[j]`` units:
    ``(j, lo, hi)`` for units ``lo:hi`` of micro-batch ``j``. The shares of the ranks are
    contiguous, in rank order, and as even as can be (sizes differ by at most one unit)."""
    total = sum(sizes)
    lo, hi = total * rank // size, total * (rank + 1) // size
    out, pos = [], 0
    for j, n in enumerate(sizes):
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((j, a - pos, b - pos))
        pos += n
    return out


def splittable(epoch_batches) -> bool:
    """Whether a batch of ``epoch_batches`` can be rebuilt from some of its rows (the
    project's ``EpochBatches``: ``groups`` of row ids and a ``source.make_batch``)."""
    return hasattr(epoch_batches, "groups") and hasattr(getattr(epoch_batches, "source", None),
                                                        "make_batch")


def local_batches(
    micro: Sequence[tuple[int, Any, int]], world: World, seed: int
) -> Iterator[tuple[int, Any]]:
    """This rank's batches of one step: ``micro`` lists the step's micro-batches as
    ``(m, epoch_batches, i)`` (micro-batch ``m`` of the run is ``epoch_batches[i]``).
    Yields ``(dropout seed, batch)``."""
    if not micro:
        return
    split = all(splittable(eb) for _, eb, _ in micro)
    sizes = [len(eb.groups[i]) if split else 1 for _, eb, i in micro]
    for j, lo, hi in step_pieces(sizes, world.rank, world.size):
        m, eb, i = micro[j]
        whole = not split or (lo == 0 and hi == sizes[j])
        key = seed * 1_000_003 + m if lo == 0 else hash((seed, m, lo)) % 2**31
        yield key, (eb[i] if whole else eb.source.make_batch(list(eb.groups[i][lo:hi])))


def sum_step(world: World, grads, loss_sum: mx.array, count: mx.array, tokens: int,
             params, step: int):
    """The step's gradient sum, loss sum, item count and token count over all ranks
    (``grads`` None on a rank without rows: zeros shaped as ``params``)."""
    if grads is None:
        grads = tree_map(mx.zeros_like, params)
    what = f"the gradient sum of step {step + 1}"
    grads = world.all_sum(grads, what)
    loss_sum = world.all_sum(loss_sum.astype(mx.float32), what)
    counts = world.all_sum(mx.array([int(count.item()), int(tokens)], mx.int64), what)
    return grads, loss_sum, counts[0], int(counts[1].item())


def sync_parameters(world: World, model) -> None:
    """Rank 0's trainable parameters on every rank (all ranks then step in lockstep)."""
    if world.size > 1:
        params = world.broadcast(model.trainable_parameters(), "copying rank 0's parameters")
        model.update(params)


def evaluate_shared(model, loss_fn: Callable, batches, max_batches: int, world: World):
    """(loss sum, count) over ``batches`` (the first ``max_batches`` unless -1), batch ``i``
    computed by rank ``i % size``, the sums added across the ranks."""
    total, count = mx.array(0.0), mx.array(0)
    n = len(batches) if hasattr(batches, "__len__") else None
    if n is not None and hasattr(batches, "__getitem__"):
        limit = n if max_batches < 0 else min(n, max_batches)
        mine = (batches[i] for i in range(world.rank, limit, world.size))
    else:
        mine = (b for i, b in enumerate(batches)
                if (max_batches < 0 or i < max_batches) and i % world.size == world.rank)
    for batch in mine:
        s, c = loss_fn(model, batch)
        total, count = total + s.astype(mx.float32), count + c
        mx.eval(total, count)
    total = world.all_sum(total, "the validation loss")
    count = world.all_sum(mx.array(int(mx.array(count).item()), mx.int64), "the validation loss")
    return total, count


def shared_checkpoint(world: World, load: Callable[[], tuple]):
    """The checkpoint rank 0 reads (``load()`` -> (path, params, flat optimizer state,
    state)) on every rank, so no other rank needs to see rank 0's disk. A refused
    checkpoint is the same error on every rank."""
    if world.size == 1:
        return load()
    msg: Optional[dict] = None
    if world.is_main:
        try:
            path, params, opt, state = load()
            msg = {"path": str(path), "state": state, "params": _shapes(params),
                   "opt": _shapes(opt)}
        except Llama2Error as e:
            msg = {"error": str(e)}
    msg = world.broadcast_object(msg, "reading the checkpoint")
    if "error" in msg:
        raise Llama2Error(msg["error"])
    if not world.is_main:
        params, opt = _zeros(msg["params"]), _zeros(msg["opt"])
    params = world.broadcast(params, "copying the checkpoint")
    opt = world.broadcast(opt, "copying the checkpoint")
    return Path(msg["path"]), params, opt, msg["state"]


def _shapes(arrays: dict) -> dict:
    return {k: [list(v.shape), str(v.dtype).rsplit(".", 1)[-1]] for k, v in arrays.items()}


def _zeros(shapes: dict) -> dict:
    return {k: mx.zeros(shape, getattr(mx, dtype)) for k, (shape, dtype) in shapes.items()}
