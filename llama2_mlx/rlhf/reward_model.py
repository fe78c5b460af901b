"""The reward model itself (Touvron et al. 2023, §3.2.2): the policy's backbone with a
scalar head (``RewardModel``), the pairwise margin loss, held-out metrics, scoring of
token sequences and responses, and the reward model folder (save / load).

Importable from ``reward`` as well, which adds the training on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from llama2_mlx.errors import Llama2Error, one_line
from llama2_mlx.formats.safetensors import read_safetensors
from llama2_mlx.formats.weights import check_state_dict, parameter_shapes
from llama2_mlx.io.hub import reference
from llama2_mlx.io.readers import exists, read_json
from llama2_mlx.models.cache import common_prefix_length, fork, make_cache
from llama2_mlx.models.model import LlamaModel, ModelArgs, Transformer, eval_mode
from llama2_mlx.rlhf.reward_data import (
    RATINGS,
    EncodedPair,
    PairBatch,
    encode_response,
    pad_right,
)

CONFIG_NAME = "reward_config.json"
HEAD_NAME = "head.safetensors"
BACKBONE_NAME = "backbone.safetensors"


# --------------------------------------------------------------------------- model


class RewardModel(nn.Module):
    """The Llama 2 backbone (``model``: embedding, blocks, final norm) and a scalar head.

    ``rm(tokens, lengths)`` takes right-padded (B, T) tokens and the real lengths and
    returns the (B,) rewards read at position ``lengths - 1`` of each row (attention is
    causal, so the padding after a row's last token cannot change its reward).
    Parameter names match the policy's (``model.layers.0...``), so LoRA adapters of
    either have the same keys; the head is ``score.weight`` of shape (1, dim). With a
    ``cache``, the tokens continue the sequence already in it. Sequences longer than
    ``max_len`` (once loaded: the length it was trained at) keep their last tokens.
    """

    def __init__(self, args: ModelArgs, backbone: Optional[LlamaModel] = None):
        super().__init__()
        self.args = args
        self.model = backbone if backbone is not None else LlamaModel(args)
        # No bias: the pairwise loss is unchanged by a constant shift, so it would never train.
        self.score = nn.Linear(args.dim, 1, bias=False)
        self.score.weight = mx.random.normal((1, args.dim)) * args.dim**-0.5
        self.max_len = args.max_seq_len

    @classmethod
    def from_policy(cls, policy: Transformer) -> "RewardModel":
        """Take ``policy``'s backbone (its weights, LoRA layers included); drop its LM head."""
        return cls(policy.args, policy.model)

    @property
    def layers(self):
        return self.model.layers

    def __call__(self, tokens: mx.array, lengths: mx.array, cache=None) -> mx.array:
        h = self.model(tokens, cache=cache)  # (B, T, dim) after the final norm
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
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    with eval_mode(rm):
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            tokens, lengths = pad_right([seqs[j] for j in idx], pad_id)
            r = rm(tokens, lengths).astype(mx.float32)
            for j, v in zip(idx, r.tolist()):
                out[j] = v
    return out


def score_shared_prefix(rm: RewardModel, seqs: Sequence[Sequence[int]], *,
                        batch_size: Optional[int] = None, pad_id: int = 0) -> list[float]:
    """The rewards of sequences that share a prefix (K answers to one prompt), as one batch.

    The shared prefix is run once with batch 1 into a KV cache, which every sequence
    reads (``cache.fork``: one copy) and only the (right-padded) remainders are run; equal to
    ``score_sequences`` up to float rounding; the remainders run ``batch_size`` at a time
    (default: all at once). Without a shared prefix it is ``score_sequences``.
    """
    batch_size = batch_size or max(len(seqs), 1)
    if len(seqs) < 2:
        return score_sequences(rm, seqs, batch_size=batch_size, pad_id=pad_id)
    L = min(common_prefix_length(seqs), min(len(s) for s in seqs) - 1)  # >= 1 token left per row
    if L < 1:
        return score_sequences(rm, seqs, batch_size=batch_size, pad_id=pad_id)
    with eval_mode(rm):
        prefix = make_cache(rm)
        rm.model(mx.array([list(seqs[0][:L])]), cache=prefix)
        mx.eval([c.state for c in prefix])
        rewards: list[float] = []
        for i in range(0, len(seqs), batch_size):
            tokens, lengths = pad_right([s[L:] for s in seqs[i : i + batch_size]], pad_id)
            cache = fork(prefix, tokens.shape[0])  # every chunk reads the one prefilled prompt
            rewards += rm(tokens, lengths, cache=cache).astype(mx.float32).tolist()
        return rewards


def score_responses(rm: RewardModel, tokenizer, prompts: Sequence[Sequence[dict]],
                    responses: Sequence[str], *, batch_size: int = 16,
                    max_len: Optional[int] = None) -> list[float]:
    """The reward of each (prompt messages, response text) pair of the two lists."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or rm.max_len
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


def save_reward_model(rm: RewardModel, out_dir, *, base_model, fine_tune_type: str = "lora",
                      lora_config=None, extra: Optional[dict] = None) -> Path:
    """Write the reward model folder: the head (``head.safetensors``), the backbone update
    (LoRA: ``adapters.safetensors`` + ``adapter_config.json`` in mlx-lm's format; full:
    ``backbone.safetensors``) and ``reward_config.json`` (base model, type, ``extra``),
    all together or none (``atomic_files``), each checked finite."""
    import json

    from mlx.utils import tree_flatten

    from llama2_mlx.io.atomic import atomic_files, save_weights
    from llama2_mlx.models.lora import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        adapter_config_dict,
        adapter_weights,
    )

    out = Path(out_dir)
    weights: dict[str, dict] = {}
    jsons: dict[str, dict] = {}
    if fine_tune_type == "lora":
        if lora_config is None:
            raise ValueError("a LoRA reward model needs its LoRAConfig")
        weights[ADAPTER_WEIGHTS] = adapter_weights(rm)
        if not weights[ADAPTER_WEIGHTS]:
            raise Llama2Error("save_reward_model: the model has no LoRA layers")
        jsons[ADAPTER_CONFIG] = adapter_config_dict(lora_config, len(rm.layers))
    elif fine_tune_type == "full":
        weights[BACKBONE_NAME] = {k: v for k, v in tree_flatten(rm.parameters())
                                  if k.startswith("model.")}
    else:
        raise Llama2Error(f"fine_tune_type must be lora or full, not {fine_tune_type!r}")
    weights[HEAD_NAME] = {"score.weight": rm.score.weight}
    jsons[CONFIG_NAME] = {  # written last: a reader starts from it
        "model_type": "llama2_reward_model", "base_model": reference(base_model),
        "fine_tune_type": fine_tune_type, "dim": rm.args.dim, "max_seq_len": rm.max_len,
        **(extra or {})}
    names = list(weights) + list(jsons)
    with atomic_files(*(out / n for n in names)) as tmps:
        for name, tmp in zip(names, tmps):
            if name in weights:
                save_weights(tmp, weights[name])
            else:
                with open(tmp, "w") as f:
                    json.dump(jsons[name], f, indent=2)
                    f.write("\n")
    return out


def read_reward_config(path) -> dict:
    """The ``reward_config.json`` of a reward model folder."""
    f = Path(path) / CONFIG_NAME
    if not exists(f):
        raise Llama2Error(f"{path}: not a reward model folder (no {CONFIG_NAME})")
    config = read_json(f)
    for key in ("base_model", "fine_tune_type"):
        if not isinstance(config.get(key), str):
            raise Llama2Error(f"{f}: has no {key!r} (a string)")
    for key in ("dim", "max_seq_len"):
        value = config.get(key)
        if value is not None and (type(value) is not int or not 1 <= value <= 1 << 24):
            raise Llama2Error(f"{f}: {key} = {one_line(repr(value), 40)} is not a size")
    return config


def load_reward_model(path, *, dtype=None, base_model=None, shared=None):
    """``(reward model, tokenizer)`` from a folder written by ``save_reward_model``; the base
    weights come from the recorded ``base_model`` (or ``base_model`` given here). When
    ``shared`` (a ``SharedBase``) is that base, its weights are shared, not loaded again."""
    from llama2_mlx.checkpoints.load import load

    path = Path(path)
    config = read_reward_config(path)
    ref = base_model or config["base_model"]
    if shared is not None and shared.serves(ref, dtype):
        policy, tokenizer = shared.policy()
    else:
        policy, tokenizer = load(ref, dtype=dtype)
    rm = RewardModel.from_policy(policy)
    if rm.args.dim != config.get("dim", rm.args.dim):
        raise Llama2Error(f"{path}: made for dim {config['dim']}, the base model has {rm.args.dim}")
    if config["fine_tune_type"] == "lora":
        from llama2_mlx.models.lora import load_adapters

        load_adapters(rm, path)
    else:
        _load_checked(rm, path / BACKBONE_NAME, prefix="model.")
    _load_checked(rm, path / HEAD_NAME, prefix="score.")
    rm.score.weight = rm.score.weight.astype(mx.float32)
    rm.max_len = config.get("max_seq_len") or rm.max_len
    rm.eval()
    mx.eval(rm.parameters())
    return rm, tokenizer


def _load_checked(rm: RewardModel, file: Path, prefix: str) -> None:
    """Load the ``prefix`` part of the reward model (head or backbone) from ``file``."""
    weights = read_safetensors(file)
    expected = {k: v for k, v in parameter_shapes(rm).items() if k.startswith(prefix)}
    check_state_dict(weights, expected, file, what="the reward model")
    rm.load_weights(list(weights.items()), strict=False)
