"""Supervised fine-tuning data: JSONL records to token samples to batches.

Records (one JSON object a line): the dialog records of ``chat.records`` (``{"prompt",
"completion"}`` with an optional ``"system"``, or ``{"messages": [...]}``, multi-turn) or
``{"text"}`` (plain language modelling). A sample is its tokens and a flag per
token saying whether it is a training target: answer tokens and the EOS that
ends each answer (every assistant turn but those marked ``"train": false``), never
the prompt, the chat markup or padding.

Batches are packed (samples concatenated into rows of ``max_seq_length``
positions, a block-diagonal causal mask keeping them apart; as in §3.1 of the
paper) or padded (samples sorted by length, batched, padded at the end).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from llama2_mlx.chat.records import (
    has_dialog,
    read_records,
    sft_dialog,
    string_field,
    trained_answers,
)
from llama2_mlx.errors import Llama2Error, OptionError

LONG_POLICIES = ("error", "truncate", "skip")
PAD_ID = 0  # padding input id (never a target)


@dataclass
class Sample:
    """Token ids and, per token, whether predicting it is a training target."""

    tokens: list[int]
    targets: list[bool]
    where: str = ""

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_targets(self) -> int:
        # Token 0 is never predicted.
        return sum(self.targets[1:])


def tokenize_record(record: dict, tokenizer, where: str = "record") -> Sample:
    """The sample of one record (``where`` names it in errors, e.g. ``train.jsonl line 3``):
    a dialog (``records.sft_dialog``) or ``{"text"}``."""
    if "text" in record and not has_dialog(record):
        ids = tokenizer.encode(string_field(record, "text", where), bos=True, eos=True)
        return Sample(ids, [True] * len(ids), where)
    messages = sft_dialog(record, where)
    flags = trained_answers(messages, where)  # one per assistant turn, in order
    trained = iter(flags)
    tokens, targets = [], []
    for ids, is_answer in tokenizer.chat_segments(messages, where=where):
        # Each answer segment (answer + EOS) is the next assistant turn's.
        is_target = is_answer and next(trained)
        tokens += ids
        targets += [is_target] * len(ids)
    sample = Sample(tokens, targets, where)
    if sample.num_targets == 0:
        why = " (every assistant turn says \"train\": false)" if flags and not any(flags) else ""
        raise Llama2Error(f"{where}: no assistant answer to train on{why}")
    return sample


def load_samples(path, tokenizer) -> list[Sample]:
    """Every record of a JSONL file as a sample (errors name the file and line)."""
    return [tokenize_record(rec, tokenizer, where) for where, rec in read_records(path)]


@dataclass
class LengthReport:
    """Samples longer than a row (max_seq_length + 1 tokens) and what was done with them."""

    policy: str
    long: list[str] = field(default_factory=list)  # where of each
    dropped: list[str] = field(default_factory=list)  # truncated to nothing trainable

    def message(self, split: str, limit: int) -> Optional[str]:
        if not self.long:
            return None
        done = {"truncate": "truncated", "skip": "skipped"}[self.policy]
        msg = (f"{split}: {len(self.long)} sample(s) longer than {limit} tokens {done} "
               f"(first: {self.long[0]})")
        if self.dropped:
            msg += f"; {len(self.dropped)} had no answer token left and were skipped"
        return msg


def fit_length(samples: Sequence[Sample], max_seq_length: int, policy: str = "error"):
    """Apply the long-sample ``policy`` (error, truncate or skip) for rows of
    ``max_seq_length`` positions (a sample of n tokens takes n - 1 positions).

    Returns (samples, LengthReport).
    """
    if policy not in LONG_POLICIES:
        raise OptionError("{long_samples} must be one of {choices} (got {policy!r})",
                          choices=', '.join(LONG_POLICIES), policy=policy)
    if max_seq_length < 2:
        raise OptionError("{max_seq_length} must be at least 2 (got {got})", got=max_seq_length)
    limit = max_seq_length + 1
    report = LengthReport(policy)
    kept = []
    for s in samples:
        if len(s) <= limit:
            kept.append(s)
            continue
        report.long.append(s.where)
        if policy == "error":
            raise OptionError(
                "{where}: sample of {n} tokens is longer than {max_seq_length} {got} + 1; "
                "pass {long_samples} truncate or skip", where=s.where, n=len(s), got=max_seq_length)
        if policy == "truncate":
            cut = Sample(s.tokens[:limit], s.targets[:limit], s.where)
            if cut.num_targets:
                kept.append(cut)
            else:
                report.dropped.append(s.where)
    return kept, report


@dataclass
class Batch:
    """One micro-batch. ``inputs``/``targets``/``weights`` are (B, T); ``mask`` is a
    (B, 1, T, T) boolean block-diagonal causal mask or None (plain causal);
    ``target_index`` holds the flat positions of the weights that are 1."""

    inputs: mx.array
    targets: mx.array
    weights: mx.array
    mask: Optional[mx.array]
    target_index: mx.array
    num_tokens: int  # non-padding positions
    num_targets: int

    @property
    def slots(self) -> int:
        return self.inputs.size


@dataclass
class DataStats:
    samples: int
    rows: int
    batches: int
    tokens: int  # non-padding positions
    slots: int  # all positions, padding included
    targets: int

    @property
    def fill(self) -> float:
        """Share of positions that are not padding."""
        return self.tokens / self.slots if self.slots else 0.0


def _pack_rows(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit of samples (taking ``lengths[i]`` positions) into rows of ``capacity``."""
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []  # rows that can still take the shortest sample
    shortest = min(lengths)
    for i in order:
        n = lengths[i]
        for r in open_rows:
            if free[r] >= n:
                break
        else:
            r = len(rows)
            rows.append([])
            free.append(capacity)
            open_rows.append(r)
        rows[r].append(i)
        free[r] -= n
        if free[r] < shortest:
            open_rows.remove(r)
    return rows


class SFTBatches:
    """The batches of a sample set: ``batches(epoch)`` is a lazy sequence of ``Batch``.

    Rows are formed once (packed after a seeded shuffle, or sorted by length
    when padded); each epoch takes them in its own seeded order.
    """

    def __init__(
        self, samples: Sequence[Sample], batch_size: int, max_seq_length: int,
        pack: bool = True, seed: int = 0, shuffle: bool = True,
    ):
        if not samples:
            raise Llama2Error("no samples to batch")
        if batch_size < 1:
            raise OptionError("{batch_size} must be at least 1 (got {got})", got=batch_size)
        too_long = [s for s in samples if len(s) - 1 > max_seq_length]
        if too_long:
            raise OptionError("{where}: longer than {max_seq_length} {got}",
                              where=too_long[0].where, got=max_seq_length)
        self.samples = list(samples)
        self.batch_size, self.max_seq_length = batch_size, max_seq_length
        self.pack, self.seed, self.shuffle = pack, seed, shuffle
        lengths = [len(s) - 1 for s in self.samples]  # positions: inputs = tokens[:-1]
        if pack:
            order = np.random.RandomState(seed).permutation(len(lengths)) if shuffle else range(len(lengths))
            rows = _pack_rows(lengths, order, max_seq_length)
            # Batches of consecutive rows (re-drawn each epoch in __call__).
            self.rows = rows
            self.groups = None
        else:
            by_len = sorted(range(len(lengths)), key=lambda i: lengths[i])
            self.rows = [[i] for i in by_len]
            self.groups = [
                list(range(j, min(j + batch_size, len(by_len))))
                for j in range(0, len(by_len), batch_size)
            ]
        self.lengths = lengths

    def _epoch_groups(self, epoch: int) -> list[list[int]]:
        rng = epoch_rng(self.seed, epoch)
        if self.pack:
            order = rng.permutation(len(self.rows)) if self.shuffle else np.arange(len(self.rows))
            return [list(order[j : j + self.batch_size]) for j in range(0, len(order), self.batch_size)]
        order = rng.permutation(len(self.groups)) if self.shuffle else range(len(self.groups))
        return [self.groups[k] for k in order]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __call__(self, epoch: int) -> "EpochBatches":
        return EpochBatches(self, self._epoch_groups(epoch))

    def stats(self) -> DataStats:
        """Token counts over one epoch (every epoch has the same rows)."""
        tokens = sum(self.lengths)
        targets = sum(s.num_targets for s in self.samples)
        slots = 0
        for group in self._epoch_groups(0):
            rows = [self.rows[r] for r in group]
            slots += len(rows) * max(sum(self.lengths[i] for i in row) for row in rows)
        return DataStats(len(self.samples), len(self.rows), len(self), tokens, slots, targets)

    def make_batch(self, row_ids: Sequence[int]) -> Batch:
        rows = [self.rows[r] for r in row_ids]
        T = max(sum(self.lengths[i] for i in row) for row in rows)
        B = len(rows)
        inputs = np.full((B, T), PAD_ID, np.int32)
        targets = np.zeros((B, T), np.int32)
        weights = np.zeros((B, T), np.float32)
        segment = np.full((B, T), -1, np.int32)  # padding: its own segment
        multi = False
        for b, row in enumerate(rows):
            pos = 0
            for k, i in enumerate(row):
                s = self.samples[i]
                n = len(s) - 1
                inputs[b, pos : pos + n] = s.tokens[:-1]
                targets[b, pos : pos + n] = s.tokens[1:]
                weights[b, pos : pos + n] = s.targets[1:]
                segment[b, pos : pos + n] = k
                pos += n
            multi |= len(row) > 1
        mask = None
        if multi:
            seg = mx.array(segment)
            causal = mx.tril(mx.ones((T, T), mx.bool_))
            # (B, T, 1) == (B, 1, T) -> (B, T, T), then a head axis: (B, 1, T, T).
            mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
        index = np.flatnonzero(weights.reshape(-1)).astype(np.int32)
        return Batch(
            mx.array(inputs), mx.array(targets), mx.array(weights), mask, mx.array(index),
            int((segment >= 0).sum()), int(index.size),
        )


def epoch_rng(seed: int, epoch: int) -> np.random.RandomState:
    """The shuffling generator of one epoch: a pure function of (seed, epoch), so a resumed
    run sees the same order."""
    return np.random.RandomState((seed * 7919 + epoch) % 2**32)


class EpochBatches:
    """The batches of one epoch, built when indexed (``source.make_batch(group)``)."""

    def __init__(self, source, groups: list[list[int]]):
        self.source, self.groups = source, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> Batch:
        return self.source.make_batch(self.groups[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))
