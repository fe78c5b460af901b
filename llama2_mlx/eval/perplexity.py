"""The NLL of each sample under a model, and bootstrap intervals over samples.

``score_samples`` runs the samples of ``training.data`` (the tokens and target flags
``lora-train`` trains on) through a model and returns, per sample, the summed negative
log-likelihood of its target tokens, their number and whether greedy decoding would
have produced every one of them. The batches are ``training.data.SFTBatches`` without
packing: samples sorted by length, one sample a row (one prefill per record), padded
at the end, so that a sample's loss does not depend on what else is in its batch.
The loss at a position is ``sft_loss``'s: the float32 cross-entropy of the logits at
the target positions only.

``bootstrap`` resamples the samples (records) with replacement: each resample's
token-weighted mean NLL is the sum of the drawn samples' NLL sums over the sum of
their token counts; every model is scored on the same draws, so the interval of a
difference between two models is paired.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.progress import ProgressBar
from llama2_mlx.training.data import Sample, SFTBatches

# Target positions whose logits are computed at once (bounds the (N, vocab) logits).
LOGIT_CHUNK = 2048


@dataclass
class Scores:
    """Per-sample results of ``score_samples`` (arrays in the samples' order)."""

    nll: np.ndarray  # (R,) float64: summed NLL of the sample's target tokens (nats)
    tokens: np.ndarray  # (R,) int64: its target tokens
    greedy: np.ndarray  # (R,) bool: each target token is the argmax of its logits
    positions: int  # input positions run (padding excluded)
    seconds: float

    @property
    def mean(self) -> float:
        """Token-weighted mean NLL (nats a token)."""
        n = int(self.tokens.sum())
        return float(self.nll.sum() / n) if n else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)

    @property
    def tokens_per_s(self) -> float:
        return self.positions / self.seconds if self.seconds > 0 else 0.0


def batch_row_losses(model: nn.Module, batch, chunk: int = LOGIT_CHUNK):
    """(row, NLL, greedy hit) of each target position of ``batch`` (numpy arrays)."""
    T = batch.inputs.shape[1]
    h = model.model(batch.inputs, mask=batch.mask)  # (B, T, dim)
    h = h.reshape(-1, h.shape[-1])[batch.target_index]  # (N, dim)
    targets = batch.targets.reshape(-1)[batch.target_index]
    ce_parts, hit_parts = [], []
    for c in range(0, batch.num_targets, chunk):
        logits = model.lm_head(h[c : c + chunk]).astype(mx.float32)
        t = targets[c : c + chunk]
        ce = nn.losses.cross_entropy(logits, t)
        hit = mx.argmax(logits, axis=-1) == t
        mx.eval(ce, hit)
        ce_parts.append(np.array(ce, dtype=np.float64))
        hit_parts.append(np.array(hit))
    if not ce_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, bool)
    rows = np.array(batch.target_index) // T
    return rows, np.concatenate(ce_parts), np.concatenate(hit_parts)


def score_samples(
    model: nn.Module, samples: Sequence[Sample], *, batch_size: int = 8,
    max_seq_length: Optional[int] = None, progress: bool = False, description: str = "eval",
) -> Scores:
    """Score ``samples`` (each at most ``max_seq_length`` + 1 tokens; default: the
    longest) in length-sorted batches of ``batch_size`` rows."""
    if not samples:
        raise Llama2Error("no samples to evaluate")
    if max_seq_length is None:
        max_seq_length = max(2, max(len(s) for s in samples) - 1)
    batches = SFTBatches(samples, batch_size, max_seq_length, pack=False, shuffle=False)
    epoch = batches(0)
    R = len(samples)
    nll, miss = np.zeros(R, np.float64), np.zeros(R, np.int64)
    tokens = np.array([s.num_targets for s in samples], np.int64)
    was_training = model.training
    model.eval()
    positions, tic = 0, time.perf_counter()
    try:
        with ProgressBar(description, len(epoch), ("{tps} tok/s",), enabled=progress) as bar:
            for i, group in enumerate(epoch.groups):
                batch = epoch[i]
                rows, ce, hit = batch_row_losses(model, batch)
                index = np.array([batches.rows[r][0] for r in group])[rows]
                np.add.at(nll, index, ce)
                np.add.at(miss, index, ~hit)
                positions += batch.num_tokens
                bar.update(i + 1, tps=f"{positions / (time.perf_counter() - tic):,.0f}")
    finally:
        model.train(was_training)
    return Scores(nll, tokens, miss == 0, positions, time.perf_counter() - tic)


def resample_counts(n_records: int, resamples: int, seed: int, chunk: int = 1 << 22):
    """The bootstrap draws, as (resamples, n_records) counts of each record, in blocks of
    at most ``chunk`` entries (each block a (k, n_records) float64 array)."""
    rng = np.random.default_rng(seed)
    p = np.full(n_records, 1.0 / n_records)
    per = max(1, chunk // n_records)
    done = 0
    while done < resamples:
        k = min(per, resamples - done)
        yield rng.multinomial(n_records, p, size=k).astype(np.float64)
        done += k


def bootstrap(nll: np.ndarray, tokens: np.ndarray, resamples: int = 1000,
              seed: int = 0) -> np.ndarray:
    """(M, resamples) token-weighted mean NLL of each of M models on each resample of the
    records; ``nll`` is (M, R) per-record NLL sums, ``tokens`` (R,) their token counts."""
    nll = np.atleast_2d(np.asarray(nll, np.float64))
    tokens = np.asarray(tokens, np.float64)
    if nll.shape[1] != tokens.shape[0] or tokens.shape[0] == 0:
        raise ValueError("nll must be (models, records) and tokens (records,), records > 0")
    if resamples < 1:
        raise Llama2Error(f"--resamples must be at least 1 (got {resamples})")
    out = []
    for counts in resample_counts(tokens.shape[0], resamples, seed):
        # Resamples drawing only records without targets have no mean (all records here
        # have targets: load_samples refuses the others).
        out.append((counts @ nll.T) / (counts @ tokens)[:, None])  # (k, M)
    return np.concatenate(out).T


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of ``values``."""
    if not 0.0 < level < 1.0:
        raise Llama2Error(f"--level must be in (0, 1) (got {level})")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
