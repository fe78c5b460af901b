"""Preference data of the reward model (Touvron et al. 2023, §3.2.2).

Preference pairs read from JSONL (``parse_pair``, ``load_pairs``, ``load_reward_data``),
the margins of Table 27 by rating, the chat encoding of a prompt with a response as the
assistant turn (``encode_response``, ``encode_pairs``) and the trainer's batches of pairs
(``PairBatch``, ``PairBatches``). The model, its loss, metrics and scoring live in
``reward_model``, training in ``reward``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from llama2_mlx.chat.records import answer_of, prompt_of, read_records
from llama2_mlx.errors import Llama2Error, OptionError
from llama2_mlx.io.readers import is_dir, is_regular
from llama2_mlx.training.data import EpochBatches, epoch_rng

# Table 27: margin m(r) by preference rating.
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
MARGINS: dict[str, dict[str, float]] = {
    "small": dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0))),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0))),
    "none": dict.fromkeys(RATINGS, 0.0),
}
_RATING_ALIASES = {"unsure": "negligibly_better"}


# --------------------------------------------------------------------------- data


@dataclass
class PreferencePair:
    """One comparison: a prompt (chat messages ending with a user turn), two responses."""

    prompt: list[dict]
    chosen: str
    rejected: str
    margin: float = 0.0
    rating: Optional[str] = None


def normalize_rating(rating: str) -> Optional[str]:
    """``"Slightly better"`` -> ``"slightly_better"``; None when it is not a known rating."""
    key = rating.strip().lower().replace(" ", "_").replace("-", "_")
    key = _RATING_ALIASES.get(key, key)
    return key if key in RATINGS else None


def parse_pair(record: dict, *, margin: str = "small", where: str = "pair") -> PreferencePair:
    """Validate one ``{"prompt"|"messages", "chosen", "rejected", "margin"?, "rating"?}``
    (the prompt and the two answers by the rules of ``chat.records``).

    ``margin`` is the scheme for ratings (``small``, ``large`` or ``none``); an explicit
    numeric ``"margin"`` is used as given, except under ``none`` (no margin at all).
    """
    if margin not in MARGINS:
        raise OptionError("{margin} must be one of {choices}, not {got!r}",
                          choices=', '.join(MARGINS), got=margin)
    if not isinstance(record, dict):
        raise Llama2Error(f"{where}: expected a JSON object")
    prompt = prompt_of(record, where)
    chosen = answer_of(record, "chosen", prompt, where)
    rejected = answer_of(record, "rejected", prompt, where)
    if chosen.strip() == rejected.strip():
        raise Llama2Error(f"{where}: 'chosen' and 'rejected' are the same response")
    rating = None
    if record.get("rating") is not None:
        raw = record["rating"]
        rating = normalize_rating(raw) if isinstance(raw, str) else None
        if rating is None:
            raise Llama2Error(
                f"{where}: 'rating' must be one of {', '.join(RATINGS)}, not {raw!r}"
            )
    m = MARGINS[margin][rating] if rating is not None else 0.0
    if record.get("margin") is not None:
        raw = record["margin"]
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise Llama2Error(f"{where}: 'margin' must be a finite number, not {raw!r}")
        m = float(raw)
    if margin == "none":
        m = 0.0
    return PreferencePair(prompt, chosen, rejected, m, rating)


def load_pairs(path: str | os.PathLike, *, margin: str = "small") -> list[PreferencePair]:
    """Read a preference JSONL file (see ``parse_pair``)."""
    return [parse_pair(r, margin=margin, where=where) for where, r in read_records(path)]


def load_reward_data(
    data: str | os.PathLike, *, margin: str = "small", valid_fraction: float = 0.05, seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs from ``DIR/train.jsonl`` and ``DIR/valid.jsonl``.

    Without a ``valid.jsonl`` (or given a single file) a seeded ``valid_fraction`` of the
    pairs is held out (at least one), which ``log`` is told.
    """
    data = Path(data)
    folder = is_dir(data)  # never raises, not even on a name too long for the system
    if folder:
        train_path, valid_path = data / "train.jsonl", data / "valid.jsonl"
        if not is_regular(train_path):
            raise Llama2Error(f"{data}: no train.jsonl")
        train = load_pairs(train_path, margin=margin)
        if is_regular(valid_path):
            return train, load_pairs(valid_path, margin=margin)
    else:
        train = load_pairs(data, margin=margin)
    if len(train) < 2:
        raise Llama2Error(f"{data}: need at least 2 pairs to hold one out (or a valid.jsonl)")
    order = np.random.RandomState(seed).permutation(len(train))
    n_valid = max(1, int(round(valid_fraction * len(train))))
    if log is not None:
        where = f"no valid.jsonl in {data.resolve()}" if folder else "one file"
        log(f"{where}: {n_valid} of its {len(train)} pairs are held out for validation")
    held = set(order[:n_valid].tolist())
    return [p for i, p in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def encode_response(tokenizer, prompt: Sequence[dict], response: str,
                    max_len: Optional[int] = None) -> list[int]:
    """The chat encoding of the prompt with ``response`` as the assistant turn (EOS included).

    Longer than ``max_len``: the last ``max_len`` tokens are kept (the reward is read at
    the end, so the response is what must survive).
    """
    messages = list(prompt) + [{"role": "assistant", "content": response}]
    ids = [i for seg, _ in tokenizer.chat_segments(messages) for i in seg]
    if max_len is not None and len(ids) > max_len:
        ids = ids[-max_len:]
    return ids


@dataclass
class EncodedPair:
    """The token ids of a pair's two sequences, its margin and rating."""

    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    rating: Optional[str] = None


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair],
                 max_len: Optional[int] = None) -> list[EncodedPair]:
    """Token ids of both sides of every pair."""
    return [
        EncodedPair(encode_response(tokenizer, p.prompt, p.chosen, max_len),
                    encode_response(tokenizer, p.prompt, p.rejected, max_len), p.margin, p.rating)
        for p in pairs
    ]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[mx.array, mx.array]:
    """(B, T) int32 tokens padded on the right, and the (B,) real lengths."""
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) == 0:
        raise Llama2Error("cannot score an empty sequence")
    out = np.full((len(seqs), max(lengths)), pad_id, dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return mx.array(out), mx.array(lengths, dtype=mx.int32)


@dataclass
class PairBatch:
    """B pairs as one 2B-row batch: rows 0..B-1 chosen, B..2B-1 rejected."""

    tokens: mx.array  # (2B, T), right-padded
    lengths: mx.array  # (2B,)
    margins: mx.array  # (B,)
    num_tokens: int = 0

    @classmethod
    def from_pairs(cls, pairs: Sequence[EncodedPair], pad_id: int = 0) -> "PairBatch":
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        tokens, lengths = pad_right(seqs, pad_id)
        margins = mx.array([p.margin for p in pairs], dtype=mx.float32)
        return cls(tokens, lengths, margins, sum(len(s) for s in seqs))


class PairBatches:
    """``batches(epoch)``: the epoch's batches of ``batch_size`` pairs in a seeded order
    (the trainer's data interface); batches are built when indexed."""

    def __init__(self, pairs: Sequence[EncodedPair], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True):
        if not pairs:
            raise Llama2Error("no preference pairs to train on")
        if batch_size < 1:
            raise OptionError("{batch_size} must be at least 1 (got {got})", got=batch_size)
        self.pairs, self.batch_size, self.seed, self.shuffle = list(pairs), batch_size, seed, shuffle

    def __len__(self) -> int:
        return -(-len(self.pairs) // self.batch_size)

    def make_batch(self, group) -> PairBatch:
        return PairBatch.from_pairs([self.pairs[j] for j in group])

    def __call__(self, epoch: int) -> "EpochBatches":
        n = len(self.pairs)
        order = epoch_rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
        return EpochBatches(self, [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)])
