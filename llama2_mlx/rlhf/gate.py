"""Two reward models and the paper's gate (Touvron et al. 2023, §3.2.6 / §3.2.2).

Llama 2 trains a helpfulness and a safety reward model and combines their scores:

    R_c = R_s   if the prompt is a safety prompt or R_s < 0.15
          R_h   otherwise

on the scale the paper puts the threshold on, a probability: ``sigmoid`` of each head's
raw output (``gated_reward``). ``RewardScorer`` holds the helpfulness model and, when
given, the safety model, and scores answers with both: with one model the reward is
its raw output (as before the gate), with two it is the gated probability. Both models
load on one ``SharedBase`` (``load_scorer``): built with LoRA on the policy's base, all
three share its weights in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from llama2_mlx.errors import Llama2Error, OptionError
from llama2_mlx.rlhf.reward_data import encode_response
from llama2_mlx.rlhf.reward_model import (
    RewardModel,
    read_reward_config,
    score_sequences,
    score_shared_prefix,
)

# §3.2.6: the safety reward is used below this probability (and for every safety prompt).
SAFETY_THRESHOLD = 0.15
KINDS = ("helpfulness", "safety")


def probability(raw) -> np.ndarray:
    """``sigmoid`` of raw reward-head outputs: the scale of the paper's threshold."""
    x = np.asarray(raw, np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def gated_reward(helpful, safety, is_safety_prompt) -> np.ndarray:
    """The combined reward R_c of §3.2.6 on arrays of probabilities (broadcast):
    ``safety`` where the prompt is a safety prompt or ``safety < SAFETY_THRESHOLD``
    (strictly: at exactly 0.15 the helpfulness reward is used), else ``helpful``."""
    h, s = np.asarray(helpful, np.float64), np.asarray(safety, np.float64)
    use_safety = np.asarray(is_safety_prompt, bool) | (s < SAFETY_THRESHOLD)
    return np.where(use_safety, s, h)


@dataclass
class Scores:
    """The rewards of some answers: ``rewards`` picks the best (one model: its raw
    output; two: the gated probability), ``helpfulness`` and ``safety`` are each model's
    probability (``safety`` None without a safety model)."""

    rewards: list[float]
    helpfulness: list[float]
    safety: Optional[list[float]] = None

    def item(self, i: int) -> dict:
        """Answer ``i``'s component scores, for records (empty with one model)."""
        if self.safety is None:
            return {}
        return {"helpfulness_reward": self.helpfulness[i], "safety_reward": self.safety[i]}


class RewardScorer:
    """The helpfulness reward model (with its tokenizer) and, optionally, the safety one.

    ``score_answers`` scores K answers to one prompt (its tokens run once per model),
    ``score_responses`` (prompt, response) pairs, ``score_tokens`` token sequences already
    in the models' vocabulary (the server's: the policy's tokenizer)."""

    def __init__(self, helpful: RewardModel, helpful_tokenizer=None,
                 safety: Optional[RewardModel] = None, safety_tokenizer=None):
        self.helpful, self.helpful_tokenizer = helpful, helpful_tokenizer
        self.safety = safety
        self.safety_tokenizer = safety_tokenizer if safety_tokenizer is not None else helpful_tokenizer

    @property
    def gated(self) -> bool:
        return self.safety is not None

    @property
    def models(self) -> list[RewardModel]:
        return [self.helpful] + ([self.safety] if self.safety is not None else [])

    def combine(self, helpful_raw: Sequence[float], safety_raw: Optional[Sequence[float]],
                is_safety_prompt) -> Scores:
        """``Scores`` from each model's raw outputs and the prompts' safety flags."""
        h = probability(helpful_raw)
        if safety_raw is None:
            return Scores([float(x) for x in helpful_raw], h.tolist())
        s = probability(safety_raw)
        flags = np.broadcast_to(np.asarray(is_safety_prompt, bool), s.shape)
        return Scores(gated_reward(h, s, flags).tolist(), h.tolist(), s.tolist())

    def score_tokens(self, seqs: Sequence[Sequence[int]], is_safety_prompt=False, *,
                     shared_prefix: bool = True, batch_size: int = 16) -> Scores:
        """Scores of token sequences (prompt + answer + EOS) given to both models as they
        are (cut to each model's ``max_len``); ``shared_prefix``: the K answers to one
        prompt, whose common prefix runs once per model."""
        def run(rm):
            cut = [list(s)[-rm.max_len:] for s in seqs]
            if shared_prefix:
                return score_shared_prefix(rm, cut, batch_size=batch_size)
            return score_sequences(rm, cut, batch_size=batch_size)

        return self.combine(run(self.helpful), run(self.safety) if self.gated else None,
                            is_safety_prompt)

    def score_answers(self, prompt: Sequence[dict], answers: Sequence[str],
                      is_safety_prompt: bool = False, *, batch_size: int = 16) -> Scores:
        """Scores of K answers to one prompt (each model on its tokenizer's chat encoding
        of prompt + answer, EOS included; the prompt run once per model)."""
        def run(rm, tok):
            seqs = [encode_response(tok, prompt, a, rm.max_len) for a in answers]
            return score_shared_prefix(rm, seqs, batch_size=batch_size)

        return self.combine(run(self.helpful, self.helpful_tokenizer),
                            run(self.safety, self.safety_tokenizer) if self.gated else None,
                            is_safety_prompt)

    def score_responses(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str],
                        is_safety_prompt: Sequence[bool] = (), *, batch_size: int = 16) -> Scores:
        """Scores of (prompt, response) pairs; ``is_safety_prompt`` one flag per pair
        (default: none is a safety prompt)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        flags = list(is_safety_prompt) or [False] * len(prompts)

        def run(rm, tok):
            seqs = [encode_response(tok, p, r, rm.max_len) for p, r in zip(prompts, responses)]
            return score_sequences(rm, seqs, batch_size=batch_size)

        return self.combine(run(self.helpful, self.helpful_tokenizer),
                            run(self.safety, self.safety_tokenizer) if self.gated else None, flags)


def reward_kind(config: dict) -> str:
    """The kind recorded in a ``reward_config.json`` (helpfulness when not recorded)."""
    kind = config.get("kind", "helpfulness")
    if kind not in KINDS:
        raise Llama2Error(f"reward model kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return kind


def check_kind(path, want: str, option: str) -> None:
    """Refuse a reward model folder recorded as the other kind (``option``: the field
    that names the folder)."""
    kind = reward_kind(read_reward_config(path))
    if kind != want:
        raise OptionError("{%s} {path}: is a {kind} reward model (its reward_config.json says "
                          "kind {kind!r}); give a {want} one" % option, path=path, kind=kind,
                          want=want)


def load_scorer(reward_model, safety_reward_model=None, *, dtype=None, shared=None,
                log: Optional[Callable[[str], None]] = None) -> RewardScorer:
    """A ``RewardScorer`` of the helpfulness reward model folder and, when given, the
    safety one. Both load on ``shared`` (a ``SharedBase``; default: the helpfulness
    model's base, loaded once), so a model trained with LoRA on it shares its weights."""
    from llama2_mlx.checkpoints.shared import SharedBase
    from llama2_mlx.rlhf.reward_model import load_reward_model

    if safety_reward_model is not None:  # alone, a reward model of either kind scores
        check_kind(reward_model, "helpfulness", "reward_model")
        check_kind(safety_reward_model, "safety", "safety_reward_model")
    if shared is None:
        shared = SharedBase.load(read_reward_config(reward_model)["base_model"], dtype)
    helpful, helpful_tok = load_reward_model(reward_model, dtype=dtype, shared=shared)
    safety = safety_tok = None
    if safety_reward_model is not None:
        safety, safety_tok = load_reward_model(safety_reward_model, dtype=dtype, shared=shared)
    scorer = RewardScorer(helpful, helpful_tok, safety, safety_tok)
    if log is not None and scorer.gated and all(shared.shared_by(m) for m in scorer.models):
        log("both reward models share one copy of the base weights")
    return scorer


def as_scorer(rm, tokenizer=None) -> RewardScorer:
    """``rm`` if it is a ``RewardScorer``, else a scorer of the one reward model ``rm``."""
    return rm if isinstance(rm, RewardScorer) else RewardScorer(rm, tokenizer)
