"""``llama2 eval``: is an adapter better than its base on a data file, and by how much?

The base model and each adapter (a twin of the base over the same weight arrays, see
``models.lora.twin``) score the records of one JSONL file (``lora-train``'s records and
masking: the answer tokens of every assistant turn, or every token of a ``text``
record). Each model gets its token-weighted mean NLL and perplexity with a bootstrap
interval over records, and each adapter the paired difference to the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.atomic import write_jsonl_atomic
from llama2_mlx.io.progress import log_stderr
from llama2_mlx.models.lora import load_adapters, twin
from llama2_mlx.training.data import Sample, fit_length, load_samples
from llama2_mlx.eval.perplexity import Scores, bootstrap, interval, score_samples

BASE = "base"


@dataclass
class EvalOptions:
    """The options of ``llama2 eval`` (see ``llama2 eval --help``)."""

    model: Optional[str] = None
    data: Optional[str] = None
    adapter_paths: Sequence[str] = ()
    max_seq_length: int = 2048
    batch_size: int = 8
    long_samples: str = "error"
    dtype: Optional[str] = None
    resamples: int = 1000
    seed: int = 0
    level: float = 0.95
    progress: bool = True


@dataclass
class ModelScore:
    """One model's line of the table."""

    name: str
    adapter_path: Optional[str]
    tokens: int
    nll: float
    nll_interval: tuple[float, float]
    difference: Optional[float] = None  # nll - the base's nll (negative: better)
    difference_interval: Optional[tuple[float, float]] = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def perplexity_interval(self) -> tuple[float, float]:
        return math.exp(self.nll_interval[0]), math.exp(self.nll_interval[1])

    @property
    def clear_of_zero(self) -> Optional[bool]:
        """Whether the difference's interval excludes 0 (None for the base)."""
        if self.difference_interval is None:
            return None
        lo, hi = self.difference_interval
        return lo > 0 or hi < 0

    @property
    def verdict(self) -> str:
        if self.clear_of_zero is None:
            return ""
        if not self.clear_of_zero:
            return "not clear of zero"
        return "better, clear of zero" if self.difference < 0 else "worse, clear of zero"

    def to_dict(self) -> dict:
        out = {
            "name": self.name, "adapter_path": self.adapter_path, "tokens": self.tokens,
            "nll": self.nll, "nll_interval": list(self.nll_interval),
            "perplexity": self.perplexity, "perplexity_interval": list(self.perplexity_interval),
        }
        if self.difference is not None:
            out["difference"] = {"nll": self.difference,
                                 "interval": list(self.difference_interval),
                                 "clear_of_zero": self.clear_of_zero}
        return out


def compare(scores: dict[str, Scores], adapter_paths: dict[str, Optional[str]],
            resamples: int = 1000, seed: int = 0, level: float = 0.95) -> list[ModelScore]:
    """The table's lines: the first of ``scores`` is the base, the others are compared
    with it on the same bootstrap draws of the records."""
    names = list(scores)
    tokens = scores[names[0]].tokens
    for name in names[1:]:
        if not np.array_equal(scores[name].tokens, tokens):
            raise ValueError(f"{name}: scored on other records than {names[0]}")
    means = bootstrap(np.stack([scores[n].nll for n in names]), tokens, resamples, seed)
    base = scores[names[0]].mean
    out = []
    for m, name in enumerate(names):
        s = scores[name]
        line = ModelScore(name, adapter_paths.get(name), int(s.tokens.sum()), s.mean,
                          interval(means[m], level))
        if m:
            line.difference = s.mean - base
            line.difference_interval = interval(means[m] - means[0], level)
        out.append(line)
    return out


@dataclass
class EvalReport:
    data: str
    samples: list[Sample]
    scores: dict[str, Scores]
    models: list[ModelScore]
    settings: dict = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.scores.values())

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.scores.values())

    @property
    def tokens_per_s(self) -> float:
        return self.positions / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        """The comparison as an aligned text table, with a line saying what it shows."""
        level = f"{self.settings.get('level', 0.95):.0%}"
        head = ["model", "tokens", "NLL", f"{level} interval", "perplexity", "vs base",
                f"{level} interval", ""]
        rows = []
        for m in self.models:
            row = [m.name, f"{m.tokens:,}", f"{m.nll:.4f}",
                   f"[{m.nll_interval[0]:.4f}, {m.nll_interval[1]:.4f}]", f"{m.perplexity:.3f}"]
            if m.difference is None:
                row += ["", "", ""]
            else:
                lo, hi = m.difference_interval
                row += [f"{m.difference:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]", m.verdict]
            rows.append(row)
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        left = {0, 7}

        def fmt(r):
            cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))]
            return "  ".join(cells).rstrip()

        s = self.settings
        note = (f"NLL: mean negative log-likelihood per target token (nats) over "
                f"{len(self.samples)} records of {self.data}; intervals: {level} bootstrap "
                f"over records ({s.get('resamples', 1000)} resamples, seed {s.get('seed', 0)}),"
                f" paired for the differences to the base.")
        return "\n".join([fmt(head)] + [fmt(r) for r in rows] + [note])

    def to_dict(self) -> dict:
        return {
            "data": self.data, "records": len(self.samples),
            "settings": self.settings, "models": [m.to_dict() for m in self.models],
            "speed": {"positions": self.positions, "seconds": self.seconds,
                      "tokens_per_s": self.tokens_per_s},
        }

    def per_record(self) -> list[dict]:
        """One dict a record: where it is, its target tokens, and per model its summed
        and mean NLL and whether greedy decoding reproduces its targets."""
        out = []
        for i, s in enumerate(self.samples):
            n = int(s.num_targets)
            out.append({
                "where": s.where, "tokens": n,
                "nll_sum": {k: float(v.nll[i]) for k, v in self.scores.items()},
                "nll": {k: float(v.nll[i] / n) for k, v in self.scores.items()},
                "greedy": {k: bool(v.greedy[i]) for k, v in self.scores.items()},
            })
        return out

    def write_per_record(self, path) -> Path:
        """Write ``per_record()`` to a JSONL file (atomically)."""
        return write_jsonl_atomic(Path(path), self.per_record())


def adapter_names(paths: Sequence[str]) -> dict[str, str]:
    """Table name -> adapter path (the path as given; a repeated one is refused)."""
    names: dict[str, str] = {}
    for p in paths:
        name = str(p)
        if name in names or name == BASE:
            raise Llama2Error(f"--adapter-path {p}: given twice (or named '{BASE}')")
        names[name] = str(p)
    return names


def load_eval_samples(path, tokenizer, max_seq_length: int, long_samples: str = "error",
                      log: Callable[[str], None] = log_stderr) -> list[Sample]:
    """The samples of a JSONL file as ``lora-train`` makes them (same long-sample policy)."""
    path = Path(path)
    if not path.is_file():
        raise Llama2Error(f"--data: {path} not found")
    samples, report = fit_length(load_samples(path, tokenizer), max_seq_length, long_samples)
    if (msg := report.message(str(path), max_seq_length + 1)) is not None:
        log(msg)
    if not samples:
        raise Llama2Error(f"{path}: no record to evaluate")
    return samples


def evaluate_file(opts: EvalOptions, model=None, tokenizer=None,
                  log: Callable[[str], None] = log_stderr) -> EvalReport:
    """Score ``opts.data`` with the base model and each of ``opts.adapter_paths``.

    ``model``/``tokenizer`` default to loading ``opts.model`` (the base: it must have no
    LoRA layers of its own; adapters go on twins of it).
    """
    if opts.data is None:
        raise Llama2Error("--data is required")
    if opts.batch_size < 1:
        raise Llama2Error(f"--batch-size must be at least 1 (got {opts.batch_size})")
    if opts.resamples < 1:
        raise Llama2Error(f"--resamples must be at least 1 (got {opts.resamples})")
    if not 0.0 < opts.level < 1.0:
        raise Llama2Error(f"--level must be in (0, 1) (got {opts.level})")
    adapters = adapter_names(opts.adapter_paths)
    for p in adapters.values():
        if not Path(p).is_dir():
            raise Llama2Error(f"--adapter-path: {p} is not a folder")
    if model is None or tokenizer is None:
        if opts.model is None:
            raise Llama2Error("--model is required")
        from llama2_mlx.checkpoints.load import load

        model, tokenizer = load(opts.model, dtype=opts.dtype)
    samples = load_eval_samples(opts.data, tokenizer, opts.max_seq_length, opts.long_samples, log)
    scores: dict[str, Scores] = {}
    for name, path in {BASE: None, **adapters}.items():
        m = model if path is None else load_adapters(twin(model), path)
        scores[name] = score_samples(m, samples, batch_size=opts.batch_size,
                                     max_seq_length=opts.max_seq_length,
                                     progress=opts.progress, description=f"eval {name}")
        s = scores[name]
        log(f"{name}: {len(samples)} records, {int(s.tokens.sum()):,} target tokens, "
            f"{s.positions:,} tokens in {s.seconds:.2f}s ({s.tokens_per_s:,.0f} tokens/s)")
    settings = {"max_seq_length": opts.max_seq_length, "batch_size": opts.batch_size,
                "long_samples": opts.long_samples, "resamples": opts.resamples,
                "seed": opts.seed, "level": opts.level}
    models = compare(scores, {BASE: None, **adapters}, opts.resamples, opts.seed, opts.level)
    return EvalReport(str(opts.data), samples, scores, models, settings)
