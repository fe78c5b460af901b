"""Speculative decoding in the server: a request decoding alone (``Solo``), outside the
decode batch, with its own KV caches and ``speculative_generate_step``.

The engine (given ``drafter``, a function making a ``Drafter``) runs a request of one
sequence without logprobs that joins a lane with nothing decoding this way, one token
per engine iteration (a verify step, or a token an earlier one accepted). Requests that
join while it runs decode in the batch as usual, beside it and plainly, until it ends;
greedy output is the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from llama2_mlx.generation.speculative import Drafter, DraftStats, speculative_generate_step
from llama2_mlx.models.cache import KVCache


@dataclass
class Solo:
    """A request's speculative decoding: its steps, its own KV caches and the draft
    statistics."""

    run: object  # runs.Run
    steps: object
    cache: list
    stats: DraftStats


def make_solo(run, kv: Optional[list], drafter: Drafter, num_draft_tokens: int) -> Solo:
    """The speculative decoding of ``run`` (one sequence) from its prefilled prompt's
    keys and values ``kv`` (per layer; None: nothing prefilled)."""
    lane, prompt = run.lane, run.job.prompt
    cache = [KVCache() for _ in lane.model.layers]
    for c, layer_kv in zip(cache, kv or []):
        c.update_and_fetch(*layer_kv)
    pieces = lane.tokenizer.vocab_size

    def only_pieces(tokens, logits):  # rows of a padded vocabulary could not be decoded
        if logits.shape[-1] <= pieces:
            return logits
        pad = mx.full((*logits.shape[:-1], logits.shape[-1] - pieces), -mx.inf, logits.dtype)
        return mx.concatenate([logits[..., :pieces], pad], axis=-1)

    stats = DraftStats()
    steps = speculative_generate_step(
        lane.model, mx.array(prompt[-1:]), drafter, cache=cache,
        dist=run.job.config.make_filter(), logits_processors=run.processors + [only_pieces],
        max_tokens=run.job.config.max_tokens, context=prompt,
        num_draft_tokens=num_draft_tokens, stats=stats)
    return Solo(run, steps, cache, stats)


def next_token(solo: Solo, seed: Optional[int] = None) -> tuple[int, int, int]:
    """The next token, and the tokens drafted and accepted to get it (0 for a token
    that an earlier step verified). ``seed`` (sampling) seeds the draws of this step:
    other requests' steps reseed the generator in between."""
    if seed is not None:
        mx.random.seed(seed)
    drafted, accepted = solo.stats.drafted, solo.stats.accepted
    y, _ = next(solo.steps)
    return int(y.item()), solo.stats.drafted - drafted, solo.stats.accepted - accepted


def context(solo: Solo, tokens: list[int]) -> Optional[tuple[list[int], list]]:
    """(the tokens, their keys and values per layer) that the caches hold of ``tokens``
    (prompt and answer) for the prompt cache; None if they hold something else."""
    n = min(c.offset for c in solo.cache)
    if len(tokens) < n:
        return None
    return tokens[:n], [(mx.contiguous(c.keys[..., :n, :]), mx.contiguous(c.values[..., :n, :]))
                        for c in solo.cache]
