"""The reward model of Llama 2's RLHF (Touvron et al. 2023, §3.2.2).

The policy's transformer with its next-token head replaced by a regression
head: the final-norm hidden state at each sequence's last real token goes
through ``Linear(dim, 1)`` to a scalar reward. It is trained on preference
pairs with the margin loss ``-log(sigmoid(r(x, y_c) - r(x, y_r) - m))``.

A sequence is the Llama 2 chat encoding of the prompt with the response as the
assistant turn (``BOS [INST] ... [/INST] response EOS``, ``Tokenizer.chat_segments``):
the prompt tokens the policy generates after, the answer with its EOS, and the
very tokens ``lora-train`` learns from when the answer becomes a gold answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import Llama2Error
from .model import LlamaModel, ModelArgs, Transformer

if TYPE_CHECKING:
    from .lora import LoRAConfig
    from .trainer import TrainConfig, TrainResult

# Table 27: margin m(r) by preference rating.
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
MARGINS: dict[str, dict[str, float]] = {
    "small": dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0))),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0))),
    "none": dict.fromkeys(RATINGS, 0.0),
}
_RATING_ALIASES = {"unsure": "negligibly_better"}

CONFIG_NAME = "reward_config.json"
HEAD_NAME = "head.safetensors"
BACKBONE_NAME = "backbone.safetensors"


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


def prompt_messages(record: dict, where: str) -> list[dict]:
    """The prompt of a JSONL record as chat messages: ``"prompt"`` (a string or a list of
    messages, with an optional ``"system"``) or ``"messages"`` ending with a user turn."""
    from .tokenizer import validate_messages

    if "messages" in record and "prompt" not in record:
        messages = record["messages"]
    elif "prompt" in record:
        messages = record["prompt"]
    else:
        raise Llama2Error(f"{where}: needs a 'prompt' or 'messages'")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
        system = record.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise Llama2Error(f"{where}: 'system' must be a string")
            messages.insert(0, {"role": "system", "content": system})
    if not isinstance(messages, list):
        raise Llama2Error(f"{where}: the prompt must be a string or a list of messages")
    validate_messages(messages, where=where)
    if messages[-1]["role"] != "user":
        raise Llama2Error(f"{where}: the prompt's last message must be from the user")
    return messages


def _text_field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Llama2Error(f"{where}: {key!r} must be a non-empty string")
    return value


def parse_pair(record: dict, *, margin: str = "small", where: str = "pair") -> PreferencePair:
    """Validate one ``{"prompt"|"messages", "chosen", "rejected", "margin"?, "rating"?}``.

    ``margin`` is the scheme for ratings (``small``, ``large`` or ``none``); an explicit
    numeric ``"margin"`` is used as given, except under ``none`` (no margin at all).
    """
    if margin not in MARGINS:
        raise Llama2Error(f"--margin must be one of {', '.join(MARGINS)}, not {margin!r}")
    if not isinstance(record, dict):
        raise Llama2Error(f"{where}: expected a JSON object")
    prompt = prompt_messages(record, where)
    chosen = _text_field(record, "chosen", where)
    rejected = _text_field(record, "rejected", where)
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
    from .data import read_jsonl

    return [parse_pair(r, margin=margin, where=f"{path} line {n}") for n, r in read_jsonl(path)]


def load_reward_data(
    data: str | os.PathLike, *, margin: str = "small", valid_fraction: float = 0.05, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs from ``DIR/train.jsonl`` and ``DIR/valid.jsonl``.

    Without a ``valid.jsonl`` (or given a single file) a seeded ``valid_fraction`` of the
    pairs is held out (at least one).
    """
    data = Path(data)
    if data.is_dir():
        train_path, valid_path = data / "train.jsonl", data / "valid.jsonl"
        if not train_path.is_file():
            raise Llama2Error(f"{data}: no train.jsonl")
        train = load_pairs(train_path, margin=margin)
        if valid_path.is_file():
            return train, load_pairs(valid_path, margin=margin)
    else:
        train = load_pairs(data, margin=margin)
    if len(train) < 2:
        raise Llama2Error(f"{data}: need at least 2 pairs to hold one out (or a valid.jsonl)")
    order = np.random.RandomState(seed).permutation(len(train))
    n_valid = max(1, int(round(valid_fraction * len(train))))
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
            raise Llama2Error(f"--batch-size must be at least 1 (got {batch_size})")
        self.pairs, self.batch_size, self.seed, self.shuffle = list(pairs), batch_size, seed, shuffle

    def __len__(self) -> int:
        return -(-len(self.pairs) // self.batch_size)

    def __call__(self, epoch: int) -> list:
        n = len(self.pairs)
        order = (np.random.RandomState((self.seed * 7919 + epoch) % 2**32).permutation(n)
                 if self.shuffle else np.arange(n))
        groups = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        return _LazyBatches(self.pairs, groups)


class _LazyBatches:
    def __init__(self, pairs, groups):
        self.pairs, self.groups = pairs, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> PairBatch:
        return PairBatch.from_pairs([self.pairs[j] for j in self.groups[i]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


# --------------------------------------------------------------------------- model


class RewardModel(nn.Module):
    """The Llama 2 backbone (``model``: embedding, blocks, final norm) and a scalar head.

    ``rm(tokens, lengths)`` takes right-padded (B, T) tokens and the real lengths and
    returns the (B,) rewards read at position ``lengths - 1`` of each row (attention is
    causal, so the padding after a row's last token cannot change its reward).
    Parameter names match the policy's (``model.layers.0...``), so LoRA adapters of
    either have the same keys; the head is ``score.weight`` of shape (1, dim).
    """

    def __init__(self, args: ModelArgs, backbone: Optional[LlamaModel] = None):
        super().__init__()
        self.args = args
        self.model = backbone if backbone is not None else LlamaModel(args)
        # No bias: the pairwise loss is unchanged by a constant shift, so it would never train.
        self.score = nn.Linear(args.dim, 1, bias=False)
        self.score.weight = mx.random.normal((1, args.dim)) * args.dim**-0.5

    @classmethod
    def from_policy(cls, policy: Transformer) -> "RewardModel":
        """Take ``policy``'s backbone (its weights, LoRA layers included); drop its LM head."""
        return cls(policy.args, policy.model)

    @property
    def layers(self):
        return self.model.layers

    def __call__(self, tokens: mx.array, lengths: mx.array) -> mx.array:
        h = self.model(tokens)  # (B, T, dim) after the final norm
        last = h[mx.arange(h.shape[0]), lengths - 1]  # (B, dim) at each row's last real token
        return self.score(last.astype(self.score.weight.dtype))[:, 0]


def pairwise_loss(r_chosen: mx.array, r_rejected: mx.array, margin=0.0) -> mx.array:
    """Per-pair ``-log(sigmoid(r_c - r_r - m))`` (paper eq. 2), computed stably."""
    return mx.logaddexp(0.0, -(r_chosen - r_rejected - margin))


def reward_loss(rm: RewardModel, batch: PairBatch) -> tuple[mx.array, mx.array]:
    """(summed loss, number of pairs) of a batch: the trainer's loss function."""
    r = rm(batch.tokens, batch.lengths)
    B = batch.margins.shape[0]
    loss = pairwise_loss(r[:B], r[B:], batch.margins)
    return loss.astype(mx.float32).sum(), mx.array(B)


# --------------------------------------------------------------------------- metrics


@dataclass
class RewardMetrics:
    """Held-out metrics: accuracy (share of pairs with r_chosen > r_rejected), mean
    reward gap, mean loss, and ``per_rating``: rating -> (accuracy, number of pairs)."""

    accuracy: float
    mean_gap: float
    loss: float
    n: int
    per_rating: dict[str, tuple[float, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_rating"] = {k: {"accuracy": a, "n": n} for k, (a, n) in self.per_rating.items()}
        return d

    def summary(self) -> str:
        """One line: accuracy, gap, loss, count, then the accuracy per rating."""
        line = f"acc {self.accuracy:.3f}  gap {self.mean_gap:.3f}  loss {self.loss:.4f}  (n={self.n})"
        for k, (a, n) in self.per_rating.items():
            line += f"  {k} {a:.3f} (n={n})"
        return line


def metrics_from_rewards(r_chosen: Sequence[float], r_rejected: Sequence[float],
                         margins: Sequence[float] = (), ratings: Sequence[Optional[str]] = ()
                         ) -> RewardMetrics:
    """Accuracy, mean gap, loss and per-rating accuracy from the rewards of each pair."""
    rc, rr = np.asarray(r_chosen, np.float64), np.asarray(r_rejected, np.float64)
    if rc.size == 0:
        raise Llama2Error("no pairs to evaluate")
    m = np.asarray(margins, np.float64) if len(margins) else np.zeros_like(rc)
    win = rc > rr
    loss = float(np.mean(np.logaddexp(0.0, -(rc - rr - m))))
    per_rating = {}
    if any(r is not None for r in ratings):
        rated = np.array([r or "" for r in ratings])
        for name in RATINGS + ("",):
            sel = rated == name
            if sel.any():
                per_rating[name or "unrated"] = (float(win[sel].mean()), int(sel.sum()))
    return RewardMetrics(float(win.mean()), float(np.mean(rc - rr)), loss, int(rc.size), per_rating)


def score_sequences(rm: RewardModel, seqs: Sequence[Sequence[int]], *, batch_size: int = 16,
                    pad_id: int = 0) -> list[float]:
    """The reward of each token sequence (batched by similar length; order kept)."""
    was_training = rm.training
    rm.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    try:
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            tokens, lengths = pad_right([seqs[j] for j in idx], pad_id)
            r = rm(tokens, lengths).astype(mx.float32)
            for j, v in zip(idx, r.tolist()):
                out[j] = v
    finally:
        rm.train(was_training)
    return out


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``seqs``."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def score_shared_prefix(rm: RewardModel, seqs: Sequence[Sequence[int]], *,
                        pad_id: int = 0) -> list[float]:
    """The rewards of sequences that share a prefix (K answers to one prompt), as one batch.

    The shared prefix is run once with batch 1 into a KV cache, the cache is repeated
    for every sequence and only the (right-padded) remainders are run; equal to
    ``score_sequences`` up to float rounding. Without a shared prefix it is
    ``score_sequences``.
    """
    from .cache import make_cache

    if len(seqs) < 2:
        return score_sequences(rm, seqs, pad_id=pad_id)
    L = min(common_prefix_length(seqs), min(len(s) for s in seqs) - 1)  # >= 1 token left per row
    if L < 1:
        return score_sequences(rm, seqs, batch_size=len(seqs), pad_id=pad_id)
    was_training = rm.training
    rm.eval()
    try:
        cache = make_cache(rm)
        rm.model(mx.array([list(seqs[0][:L])]), cache=cache)
        mx.eval([(c.keys, c.values) for c in cache])
        for c in cache:
            c.expand(len(seqs))
        tokens, lengths = pad_right([s[L:] for s in seqs], pad_id)
        h = rm.model(tokens, cache=cache)  # (K, T, dim) for positions L .. L+T-1
        last = h[mx.arange(h.shape[0]), lengths - 1]
        r = rm.score(last.astype(rm.score.weight.dtype))[:, 0].astype(mx.float32)
        return r.tolist()
    finally:
        rm.train(was_training)


def score_responses(rm: RewardModel, tokenizer, prompts: Sequence[Sequence[dict]],
                    responses: Sequence[str], *, batch_size: int = 16,
                    max_len: Optional[int] = None) -> list[float]:
    """The reward of each (prompt messages, response text) pair of the two lists."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or rm.args.max_seq_len
    seqs = [encode_response(tokenizer, p, r, max_len) for p, r in zip(prompts, responses)]
    return score_sequences(rm, seqs, batch_size=batch_size)


def evaluate(rm: RewardModel, pairs: Sequence[EncodedPair], *, batch_size: int = 16) -> RewardMetrics:
    """``RewardMetrics`` of ``rm`` on encoded pairs."""
    n = len(pairs)
    if n == 0:
        raise Llama2Error("no held-out pairs to evaluate")
    r = score_sequences(rm, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                        batch_size=batch_size)
    return metrics_from_rewards(r[:n], r[n:], [p.margin for p in pairs], [p.rating for p in pairs])


# --------------------------------------------------------------------------- save / load


def _base_ref(base_model) -> str:
    p = Path(str(base_model)).expanduser()
    return str(p.resolve()) if p.exists() else str(base_model)


def save_reward_model(rm: RewardModel, out_dir, *, base_model, fine_tune_type: str = "lora",
                      lora_config=None, extra: Optional[dict] = None) -> Path:
    """Write the reward model folder: the head (``head.safetensors``), the backbone update
    (LoRA: ``adapters.safetensors`` + ``adapter_config.json`` in mlx-lm's format; full:
    ``backbone.safetensors``) and ``reward_config.json`` (base model, type, ``extra``),
    each file atomically, the config last."""
    from .checkpoint import save_safetensors_atomic, write_json_atomic
    from mlx.utils import tree_flatten

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fine_tune_type == "lora":
        from .lora import save_adapters

        if lora_config is None:
            raise ValueError("a LoRA reward model needs its LoRAConfig")
        save_adapters(rm, out, lora_config)
    elif fine_tune_type == "full":
        backbone = {k: v for k, v in tree_flatten(rm.parameters()) if k.startswith("model.")}
        save_safetensors_atomic(out / BACKBONE_NAME, backbone)
    else:
        raise Llama2Error(f"fine_tune_type must be lora or full, not {fine_tune_type!r}")
    save_safetensors_atomic(out / HEAD_NAME, {"score.weight": rm.score.weight})
    config = {"model_type": "llama2_reward_model", "base_model": _base_ref(base_model),
              "fine_tune_type": fine_tune_type, "dim": rm.args.dim, **(extra or {})}
    write_json_atomic(out / CONFIG_NAME, config)
    return out


def read_reward_config(path) -> dict:
    """The ``reward_config.json`` of a reward model folder."""
    f = Path(path) / CONFIG_NAME
    try:
        config = json.loads(f.read_text())
    except FileNotFoundError:
        raise Llama2Error(f"{path}: not a reward model folder (no {CONFIG_NAME})") from None
    except json.JSONDecodeError as e:
        raise Llama2Error(f"{f} line {e.lineno}: invalid JSON ({e.msg})") from None
    for key in ("base_model", "fine_tune_type"):
        if key not in config:
            raise Llama2Error(f"{f}: has no {key!r}")
    return config


def load_reward_model(path, *, dtype=None, base_model=None):
    """``(reward model, tokenizer)`` from a folder written by ``save_reward_model``; the base
    weights come from the recorded ``base_model`` (or ``base_model`` given here)."""
    from .loader import load

    path = Path(path)
    config = read_reward_config(path)
    policy, tokenizer = load(base_model or config["base_model"], dtype=dtype)
    rm = RewardModel.from_policy(policy)
    if rm.args.dim != config.get("dim", rm.args.dim):
        raise Llama2Error(f"{path}: made for dim {config['dim']}, the base model has {rm.args.dim}")
    if config["fine_tune_type"] == "lora":
        from .lora import load_adapters

        load_adapters(rm, path)
    else:
        _load_checked(rm, path / BACKBONE_NAME, prefix="model.")
    _load_checked(rm, path / HEAD_NAME, prefix="score.")
    rm.score.weight = rm.score.weight.astype(mx.float32)
    rm.eval()
    mx.eval(rm.parameters())
    return rm, tokenizer


def _load_checked(rm: RewardModel, file: Path, prefix: str) -> None:
    from mlx.utils import tree_flatten

    try:
        weights = mx.load(str(file))
    except FileNotFoundError:
        raise Llama2Error(f"{file}: not found") from None
    except (RuntimeError, ValueError) as e:
        raise Llama2Error(f"{file}: unreadable ({e})") from None
    params = {k: v for k, v in tree_flatten(rm.parameters()) if k.startswith(prefix)}
    for name, w in weights.items():
        if name not in params:
            raise Llama2Error(f"{file}: tensor {name} is not a parameter of the reward model")
        if tuple(w.shape) != tuple(params[name].shape):
            raise Llama2Error(f"{file}: tensor {name} has shape {tuple(w.shape)}, "
                              f"the model expects {tuple(params[name].shape)}")
    missing = sorted(set(params) - set(weights))
    if missing:
        raise Llama2Error(f"{file}: missing tensor {missing[0]} ({len(missing)} missing)")
    rm.load_weights(list(weights.items()), strict=False)


# --------------------------------------------------------------------------- training


@dataclass
class RewardTrainConfig:
    """How to train a reward model: ``fine_tune_type`` "lora" (frozen base, LoRA and the
    head trainable) or "full"; ``batch_size`` pairs per micro-batch; ``warmup`` None for
    the paper's 3% of the steps (at least 5); ``eval_every`` steps between held-out
    metrics (0: only at the end); ``max_seq_len`` keeps the last tokens of longer
    sequences. ``train`` holds the optimizer, schedule, length and checkpoint settings."""

    train: Optional["TrainConfig"] = None
    fine_tune_type: str = "lora"
    lora: Optional["LoRAConfig"] = None
    batch_size: int = 8
    eval_batch_size: int = 16
    warmup: Optional[int] = None
    eval_every: int = 50
    max_seq_len: int = 2048
    margin: str = "small"

    def __post_init__(self):
        from .lora import LoRAConfig
        from .trainer import TrainConfig

        if self.train is None:
            # The paper's RM recipe: one epoch, cosine to 10%; AdamW as in pretraining.
            self.train = TrainConfig(lr=1e-4 if self.fine_tune_type == "lora" else 1e-5,
                                     betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, epochs=1,
                                     description="reward-train")
        if self.lora is None:
            self.lora = LoRAConfig()
        if self.fine_tune_type not in ("lora", "full"):
            raise Llama2Error(f"--fine-tune-type must be lora or full, not {self.fine_tune_type!r}")
        if self.margin not in MARGINS:
            raise Llama2Error(f"--margin must be one of {', '.join(MARGINS)}, not {self.margin!r}")
        if self.eval_every < 0:
            raise Llama2Error(f"--eval-every must be >= 0 (got {self.eval_every})")


# §3.2.2: warmup over 3% of the steps, at least 5 (``TrainConfig.warmup_steps``).
PAPER_WARMUP = dict(warmup=5, warmup_ratio=0.03)


def paper_warmup(total_steps: int) -> int:
    """3% of the steps, at least 5 (§3.2.2), and never all of them."""
    from .trainer import TrainConfig

    return TrainConfig(**PAPER_WARMUP).warmup_steps(total_steps)


@dataclass
class RewardTrainResult:
    """The run (``trainer.TrainResult``) and the held-out metrics: (step, metrics) each
    evaluation, the last one being the final model's."""

    train: "TrainResult"
    metrics: list[tuple[int, RewardMetrics]]
    out_dir: Optional[Path]

    @property
    def final(self) -> RewardMetrics:
        return self.metrics[-1][1]


def prepare_reward_model(policy: Transformer, config: RewardTrainConfig, *, seed: int = 0) -> RewardModel:
    """Turn ``policy`` into a reward model (its LM head dropped) with the trainable
    parameters of ``config.fine_tune_type`` (LoRA: adapters and head; full: all)."""
    from .lora import apply_lora

    mx.random.seed(seed)
    rm = RewardModel.from_policy(policy)
    if config.fine_tune_type == "lora":
        apply_lora(rm, config.lora)
        rm.score.unfreeze()
    else:
        rm.unfreeze()
    mx.eval(rm.parameters())
    return rm


def fit_reward_model(
    rm: RewardModel, train_pairs: Sequence[EncodedPair], valid_pairs: Sequence[EncodedPair],
    config: RewardTrainConfig, *, out_dir=None, base_model=None,
    log: Optional[Callable[[str], None]] = None,
) -> RewardTrainResult:
    """Train ``rm`` (see ``prepare_reward_model``) with the shared trainer on encoded pairs;
    held-out metrics are logged every ``config.eval_every`` steps and at the end; with
    ``out_dir`` the reward model folder is written there at each checkpoint and at the end."""
    from .progress import log_stderr
    from .trainer import train

    say = log or log_stderr
    batches = PairBatches(train_pairs, config.batch_size, seed=config.train.seed)
    warmup = PAPER_WARMUP if config.warmup is None else dict(warmup=config.warmup, warmup_ratio=0.0)
    train_cfg = dataclasses.replace(config.train, **warmup, val_every=0)
    total = train_cfg.total_steps(len(batches))
    if out_dir is not None and train_cfg.checkpoint_dir is None:
        train_cfg.checkpoint_dir = Path(out_dir) / "checkpoints"
    history: list[tuple[int, RewardMetrics]] = []

    def run_eval(step: int) -> RewardMetrics:
        m = evaluate(rm, valid_pairs, batch_size=config.eval_batch_size)
        history.append((step, m))
        say(f"step {step}: held-out {m.summary()}")
        return m

    def on_step(step: int, _metrics: dict) -> None:
        if config.eval_every and step % config.eval_every == 0 and step != total:
            run_eval(step)

    def on_save(model, step: int) -> None:
        if out_dir is None:
            return
        if step == total and (not history or history[-1][0] != step):
            run_eval(step)
        last = history[-1][1].to_dict() if history else None
        save_reward_model(
            rm, out_dir, base_model=base_model, fine_tune_type=config.fine_tune_type,
            lora_config=config.lora,
            extra={"margin": config.margin, "max_seq_len": config.max_seq_len, "step": step,
                   "total_steps": total, "metrics": last},
        )

    result = train(rm, reward_loss, batches, train_cfg, on_step=on_step, on_save=on_save, log=say)
    if not history or history[-1][0] != result.steps:
        run_eval(result.steps)
    rm.eval()
    return RewardTrainResult(result, history, Path(out_dir) if out_dir is not None else None)


def train_reward_model(base_model, data, out_dir, config: Optional[RewardTrainConfig] = None, *,
                       dtype=None, log: Optional[Callable[[str], None]] = None) -> RewardTrainResult:
    """Load ``base_model``, read ``data`` (a folder with train.jsonl [+ valid.jsonl]), train a
    reward model and save it to ``out_dir`` (see ``fit_reward_model``)."""
    from .loader import load

    config = config or RewardTrainConfig()
    train_pairs, valid_pairs = load_reward_data(data, margin=config.margin, seed=config.train.seed)
    policy, tokenizer = load(base_model, dtype=dtype)
    rm = prepare_reward_model(policy, config, seed=config.train.seed)
    enc_train = encode_pairs(tokenizer, train_pairs, config.max_seq_len)
    enc_valid = encode_pairs(tokenizer, valid_pairs, config.max_seq_len)
    return fit_reward_model(rm, enc_train, enc_valid, config, out_dir=out_dir,
                            base_model=base_model, log=log)


def evaluate_file(reward_model, data, *, margin: Optional[str] = None, batch_size: int = 16,
                  dtype=None) -> RewardMetrics:
    """``RewardMetrics`` of a saved reward model on a preference JSONL file (or a data
    folder's valid.jsonl); ``margin`` defaults to the scheme it was trained with."""
    rm, tokenizer = load_reward_model(reward_model, dtype=dtype)
    config = read_reward_config(reward_model)
    margin = margin or config.get("margin", "small")
    data = Path(data)
    path = data / "valid.jsonl" if data.is_dir() else data
    pairs = load_pairs(path, margin=margin)
    enc = encode_pairs(tokenizer, pairs, config.get("max_seq_len") or rm.args.max_seq_len)
    return evaluate(rm, enc, batch_size=batch_size)


def response_of(record: dict, where: str) -> tuple[list[dict], str]:
    """(prompt messages, response) of a record to score: ``"response"`` (or ``"completion"``)
    with a ``"prompt"``/``"messages"`` prompt, or ``"messages"`` ending with the assistant."""
    for key in ("response", "completion"):
        if key in record:
            return prompt_messages(record, where), _text_field(record, key, where)
    msgs = record.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) \
            and msgs[-1].get("role") == "assistant":
        from .tokenizer import validate_messages

        validate_messages(msgs, where=where)
        return list(msgs[:-1]), _text_field(msgs[-1], "content", f"{where}: last message")
    raise Llama2Error(f"{where}: needs a 'response' (or 'completion') with a 'prompt', "
                      "or 'messages' ending with an assistant turn")


def score_file(reward_model, data, out, *, batch_size: int = 16, dtype=None,
               key: str = "reward") -> list[float]:
    """Score every prompt/response record of ``data`` (see ``response_of``) and write the
    records with their score under ``key`` to ``out``; returns the scores."""
    from .checkpoint import write_jsonl_atomic
    from .data import read_jsonl

    records = read_jsonl(data)
    items = [response_of(r, f"{data} line {n}") for n, r in records]
    rm, tokenizer = load_reward_model(reward_model, dtype=dtype)
    config = read_reward_config(reward_model)
    scores = score_responses(rm, tokenizer, [p for p, _ in items], [r for _, r in items],
                             batch_size=batch_size, max_len=config.get("max_seq_len"))
    write_jsonl_atomic(out, ({**r, key: s} for (_, r), s in zip(records, scores)))
    return scores
