"""The engine's state of each request: a ``Run`` (one ``Job``: its sampler, seed,
prefill and samples), its ``Sample`` rows, and the ``Lane`` of each served model (the
rows decoding as one ``DecodeBatch``, in batch order, with each row's next input)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from llama2_mlx.generation.generate import StopStrings
from llama2_mlx.serve.batch import DecodeBatch, SeqCache
from llama2_mlx.serve.jobs import Job, TokenInfo


class Sample:
    """One row of the decode batch: a sample of a request."""

    def __init__(self, run: "Run", index: int, tokenizer):
        self.run, self.index = run, index
        self.detok = tokenizer.detokenizer()
        self.stops = StopStrings(run.job.config.stop)
        self.tokens: list[int] = []  # sampled ids, EOS included
        self.logprob_sum = 0.0  # of the tokens but EOS
        self.eos_logprob = 0.0
        self.done = False
        self.reason: Optional[str] = None
        self.text: list[str] = []  # kept for best_of
        self.infos: list[TokenInfo] = []

    @property
    def completion_tokens(self) -> int:
        ended_with_eos = self.tokens and self.tokens[-1] == self.run.eos_id
        return len(self.tokens) - (1 if ended_with_eos else 0)

    def finish_text(self) -> str:
        return self.stops.add(self.detok.flush()) + self.stops.flush()


class Run:
    """The engine's state of one ``Job``."""

    def __init__(self, job: Job, lane: "Lane"):
        self.job, self.lane = job, lane
        self.eos_id = lane.tokenizer.eos_id
        cfg = job.config
        self.k = job.samples
        self.greedy = cfg.temp == 0
        self.sampler = cfg.make_sampler()
        self.processors = cfg.make_logits_processors()
        self.seed = cfg.seed if cfg.seed is not None else random.getrandbits(62)
        self.steps = 0
        self.history: Optional[mx.array] = None  # (k, L) ids the processors see
        self.rows = [Sample(self, i, lane.tokenizer) for i in range(self.k)]
        self.started = False  # admitted: its rows count against max_concurrency
        self.kv: Optional[list] = None  # its context so far, per layer (until it joins)
        self.todo: list[int] = []  # prompt tokens still to prefill
        self.chunks: Optional[list[SeqCache]] = None  # a long prompt's chunked prefill
        self.cached = 0
        self.outbox: list = []  # events not yet emitted
        self.needs_logprobs = job.logprobs or job.best_of is not None
        self.buffered = job.best_of is not None

    def step_seed(self) -> int:
        # A function of the request's seed and its step only: reproducible whatever else
        # is in the batch.
        return hash((self.seed, self.steps)) & (2**63 - 1)


class Lane:
    """The decode batch of one served model (the base or an adapter)."""

    def __init__(self, name: str, model, tokenizer):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.reset()

    def reset(self) -> None:
        self.solo = None  # a lone request decoding speculatively (solo.Solo)
        self.batch = DecodeBatch(len(self.model.layers))
        self.rows: list[Sample] = []  # in batch order
        self.next: Optional[mx.array] = None  # (B,) each row's next input token
        self.inflight = None
        self.segments: list[tuple[Run, int, int]] = []

    def _resegment(self) -> None:
        self.segments = []
        for i, row in enumerate(self.rows):
            if self.segments and self.segments[-1][0] is row.run:
                run, s, _ = self.segments[-1]
                self.segments[-1] = (run, s, i + 1)
            else:
                self.segments.append((row.run, i, i + 1))

    def add(self, run: Run, kv) -> None:
        """Rows for ``run`` continuing its prefilled prompt ``kv`` (None: empty)."""
        first = mx.array([run.job.prompt[-1]] * run.k)
        if run.k > 1 and kv is not None:
            self.batch.add_group(kv, run.k)
            at = len(self.rows)
        else:
            at = self.batch.n_plain
            for _ in range(run.k):
                self.batch.add_plain(kv)
        self.rows[at:at] = run.rows
        if self.next is None:
            self.next = first
        else:
            self.next = mx.concatenate([self.next[:at], first, self.next[at:]])
        self._resegment()

    def keep(self, idx: list[int]) -> None:
        self.batch.keep(idx)
        self.rows = [self.rows[i] for i in idx]
        self.next = self.next[mx.array(idx)] if idx else None
        self._resegment()


@dataclass
class StepOut:
    rows: list[Sample]
    segments: list
    y: mx.array
    logprobs: Optional[mx.array]
    tops: dict

