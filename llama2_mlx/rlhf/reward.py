"""The reward model of Llama 2's RLHF (Touvron et al. 2023, §3.2.2).

The policy's transformer with its next-token head replaced by a regression
head: the final-norm hidden state at each sequence's last real token goes
through ``Linear(dim, 1)`` to a scalar reward. It is trained on preference
pairs with the margin loss ``-log(sigmoid(r(x, y_c) - r(x, y_r) - m))``.

A sequence is the Llama 2 chat encoding of the prompt with the response as the
assistant turn (``BOS [INST] ... [/INST] response EOS``, ``Tokenizer.chat_segments``):
the prompt tokens the policy generates after, the answer with its EOS, and the
very tokens ``lora-train`` learns from when the answer becomes a gold answer.

Layout: ``reward_data`` reads and encodes the preference pairs and batches them,
``reward_model`` holds the model, loss, metrics, scoring and save / load, and this
module trains and evaluates reward models (and the ``reward-*`` commands' file
helpers); the pair data and the model itself live in reward_data.py and reward_model.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import mlx.core as mx

from llama2_mlx.chat.records import read_records, response_of, safety_flag
from llama2_mlx.errors import OptionError, OptionText, check_fields
from llama2_mlx.io.readers import is_dir
from llama2_mlx.models.model import Transformer
from llama2_mlx.rlhf.gate import KINDS, load_scorer
from llama2_mlx.rlhf.reward_data import (
    MARGINS,
    EncodedPair,
    PairBatches,
    encode_pairs,
    load_pairs,
    load_reward_data,
)
from llama2_mlx.rlhf.reward_model import (
    BACKBONE_NAME,
    CONFIG_NAME,
    HEAD_NAME,
    RewardMetrics,
    RewardModel,
    evaluate,
    load_reward_model,
    read_reward_config,
    reward_loss,
    save_reward_model,
    score_responses,
)

if TYPE_CHECKING:
    from llama2_mlx.models.lora import LoRAConfig
    from llama2_mlx.training.trainer import TrainConfig, TrainResult


# --------------------------------------------------------------------------- training


def paper_train_config(fine_tune_type: str = "lora", **options) -> "TrainConfig":
    """The paper's reward-model optimizer recipe (one epoch, cosine to 10%; AdamW as in
    pretraining; lr 1e-4 for LoRA, 1e-5 for full) with ``options`` (a ``TrainConfig``
    field each; None keeps the recipe's value) on top."""
    from llama2_mlx.training.trainer import TrainConfig

    recipe = dict(lr=1e-4 if fine_tune_type == "lora" else 1e-5, betas=(0.9, 0.95), eps=1e-5,
                  weight_decay=0.1, description="reward-train")
    return TrainConfig(**{**recipe, **{k: v for k, v in options.items() if v is not None}})


@dataclass
class RewardTrainConfig:
    """How to train a reward model: ``fine_tune_type`` "lora" (frozen base, LoRA and the
    head trainable) or "full"; ``batch_size`` pairs per micro-batch; ``warmup`` None for
    the paper's 3% of the steps (at least 5); ``eval_every`` steps between held-out
    metrics (0: only at the end); ``max_seq_len`` keeps the last tokens of longer
    sequences. ``train`` holds the optimizer, schedule, length and checkpoint settings
    (default: ``paper_train_config(fine_tune_type)``). A field's ``help`` is its
    ``reward-train`` option's help text."""

    train: Optional["TrainConfig"] = None
    fine_tune_type: str = field(default="lora", metadata={
        "help": "lora (frozen base) or full (tiny models)."})
    lora: Optional["LoRAConfig"] = None
    batch_size: int = field(default=8, metadata={"help": "Pairs per micro-batch.", "min": 1})
    eval_batch_size: int = field(default=16, metadata={"min": 1})
    warmup: Optional[int] = field(default=None, metadata={
        "help": "Warmup steps (default: 3% of the steps, at least 5).", "min": 0})
    eval_every: int = field(default=50, metadata={
        "help": "Held-out metrics every N steps (0: at the end only).", "min": 0})
    max_seq_len: int = field(default=2048, metadata={
        "help": "Keep the last N tokens of longer sequences.", "min": 2})
    margin: str = field(default="small", metadata={
        "help": "Margin by rating (Table 27): small 1, 2/3, 1/3, 0; large 3, 2, 1, 0; none."})
    kind: str = field(default="helpfulness", metadata={
        "help": "The reward model's kind, helpfulness or safety (recorded in its "
                "reward_config.json; the gate of rejection-sample --safety-reward-model)."})

    def __post_init__(self):
        from llama2_mlx.models.lora import LoRAConfig

        if self.train is None:
            self.train = paper_train_config(self.fine_tune_type)
        if self.lora is None:
            self.lora = LoRAConfig()
        check_fields(self)  # the ranges in the fields' metadata
        if self.fine_tune_type not in ("lora", "full"):
            raise OptionError("{fine_tune_type} must be lora or full, not {got!r}",
                              got=self.fine_tune_type)
        if self.margin not in MARGINS:
            raise OptionError("{margin} must be one of {choices}, not {got!r}",
                              choices=', '.join(MARGINS), got=self.margin)
        if self.kind not in KINDS:
            raise OptionError("{kind} must be one of {choices}, not {got!r}",
                              choices=', '.join(KINDS), got=self.kind)
        if self.eval_every < 0:
            raise OptionError("{eval_every} must be >= 0 (got {got})", got=self.eval_every)


# §3.2.2: warmup over 3% of the steps, at least 5 (``TrainConfig.warmup_steps``).
PAPER_WARMUP = dict(warmup=5, warmup_ratio=0.03)


def paper_warmup(total_steps: int) -> int:
    """3% of the steps, at least 5 (§3.2.2), and never all of them."""
    from llama2_mlx.training.trainer import TrainConfig

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
    from llama2_mlx.models.lora import apply_lora

    mx.random.seed(seed)
    rm = RewardModel.from_policy(policy)
    rm.max_len = config.max_seq_len
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
    log: Optional[Callable[[str], None]] = None, claim=None,
) -> RewardTrainResult:
    """Train ``rm`` (see ``prepare_reward_model``) with the shared trainer on encoded pairs;
    held-out metrics are logged every ``config.eval_every`` steps and at the end; with
    ``out_dir`` the reward model folder is written there at each checkpoint and at the end,
    and the metrics to its ``metrics.jsonl`` (held-out loss, accuracy and reward gap as
    "val" records). ``claim`` (an ``io.outdir.Claim`` of ``out_dir``) is committed at
    the first save."""
    from llama2_mlx.io.distributed import world
    from llama2_mlx.io.progress import log_stderr
    from llama2_mlx.training.metrics import METRICS_FILE, MetricsLog
    from llama2_mlx.training.trainer import train

    say = world().main_only(log or log_stderr)  # under mlx.launch: rank 0 (which alone saves)
    batches = PairBatches(train_pairs, config.batch_size, seed=config.train.seed)
    warmup = PAPER_WARMUP if config.warmup is None else dict(warmup=config.warmup, warmup_ratio=0.0)
    train_cfg = dataclasses.replace(config.train, **warmup, val_every=0)
    total = train_cfg.total_steps(len(batches))
    if out_dir is not None and train_cfg.checkpoint_dir is None:
        train_cfg.checkpoint_dir = Path(out_dir) / "checkpoints"
    history: list[tuple[int, RewardMetrics]] = []
    metrics = MetricsLog(Path(out_dir) / METRICS_FILE) if out_dir is not None else None

    def run_eval(step: int) -> RewardMetrics:
        m = evaluate(rm, valid_pairs, batch_size=config.eval_batch_size)
        history.append((step, m))
        say(f"step {step}: held-out {m.summary()}")
        if metrics is not None:
            metrics.write("val", step, val_loss=m.loss, val_accuracy=m.accuracy,
                          val_gap=m.mean_gap)
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
            extra={"kind": config.kind, "margin": config.margin, "step": step,
                   "total_steps": total, "metrics": last},
        )
        if claim is not None:
            claim.commit()

    result = train(rm, reward_loss, batches, train_cfg, on_step=on_step, on_save=on_save, log=say,
                   metrics=metrics)
    if not history or history[-1][0] != result.steps:
        run_eval(result.steps)
    rm.eval()
    return RewardTrainResult(result, history, Path(out_dir) if out_dir is not None else None)


def train_reward_model(base_model, data, out_dir, config: Optional[RewardTrainConfig] = None, *,
                       dtype=None, log: Optional[Callable[[str], None]] = None) -> RewardTrainResult:
    """Load ``base_model``, read ``data`` (a folder with train.jsonl [+ valid.jsonl]), train a
    reward model and save it to ``out_dir`` (see ``fit_reward_model``). Sequences longer
    than the model's context are cut to it (with a note)."""
    from llama2_mlx.io.distributed import world
    from llama2_mlx.io.outdir import claim_output
    from llama2_mlx.io.progress import log_stderr

    say = log or log_stderr
    config = config or RewardTrainConfig()
    # The output folder first: locked, writable, an earlier reward model kept.
    with claim_output(out_dir, field="out", artefacts=REWARD_ARTEFACTS, results=REWARD_RESULTS,
                      resume=config.train.resume, overwrite=config.train.overwrite,
                      continues="{resume}", say=world().main_only(say), world=world()) as claim:
        return _train_reward_model(base_model, data, out_dir, config, dtype, log, say, claim)


# What reward-train leaves in its folder, and those of them that are results to keep.
REWARD_ARTEFACTS = (CONFIG_NAME, HEAD_NAME, BACKBONE_NAME, "adapters.safetensors",
                    "adapter_config.json", "checkpoints", "metrics.jsonl")
REWARD_RESULTS = (HEAD_NAME, "checkpoints/step_*")


def _train_reward_model(base_model, data, out_dir, config: RewardTrainConfig, dtype, log, say,
                        claim) -> RewardTrainResult:
    from llama2_mlx.checkpoints.load import load

    train_pairs, valid_pairs = load_reward_data(data, margin=config.margin, seed=config.train.seed,
                                                log=say)
    policy, tokenizer = load(base_model, dtype=dtype)
    context = policy.args.max_seq_len
    if config.max_seq_len > context:
        say(OptionText("{max_seq_len} {got} is above the model's context of {context} tokens: "
                       "the last {context} tokens of longer sequences are kept",
                       got=config.max_seq_len, context=context))
        config = dataclasses.replace(config, max_seq_len=context)
    rm = prepare_reward_model(policy, config, seed=config.train.seed)
    enc_train = encode_pairs(tokenizer, train_pairs, config.max_seq_len)
    enc_valid = encode_pairs(tokenizer, valid_pairs, config.max_seq_len)
    return fit_reward_model(rm, enc_train, enc_valid, config, out_dir=out_dir,
                            base_model=base_model, log=log, claim=claim)


def evaluate_file(reward_model, data, *, margin: Optional[str] = None, batch_size: int = 16,
                  dtype=None) -> RewardMetrics:
    """``RewardMetrics`` of a saved reward model (of either kind: ``gate.reward_kind``
    of its config) on a preference JSONL file (or a data folder's valid.jsonl), with the
    accuracy per rating; ``margin`` defaults to the scheme it was trained with."""
    rm, tokenizer = load_reward_model(reward_model, dtype=dtype)
    config = read_reward_config(reward_model)
    margin = margin or config.get("margin", "small")
    data = Path(data)
    path = data / "valid.jsonl" if is_dir(data) else data
    pairs = load_pairs(path, margin=margin)
    enc = encode_pairs(tokenizer, pairs, rm.max_len)
    return evaluate(rm, enc, batch_size=batch_size)



def score_file(reward_model, data, out, *, batch_size: int = 16, dtype=None,
               key: str = "reward", safety_reward_model=None) -> list[float]:
    """Score every prompt/response record of ``data`` (see ``response_of``) and write the
    records with their score under ``key`` to ``out``; returns the scores. With
    ``safety_reward_model`` the score is the gated reward of §3.2.6 (``gate``; a record's
    ``"safety": true`` marks a safety prompt) and each record also gets its
    ``helpfulness_reward`` and ``safety_reward`` (probabilities)."""
    from llama2_mlx.io.atomic import write_jsonl_atomic
    from llama2_mlx.io.outdir import check_output_file

    check_output_file(out, "out")  # before any model is loaded
    records = read_records(data)
    items = [response_of(r, where) for where, r in records]
    prompts, responses = [p for p, _ in items], [r for _, r in items]
    if safety_reward_model is None:
        rm, tokenizer = load_reward_model(reward_model, dtype=dtype)
        scores = score_responses(rm, tokenizer, prompts, responses, batch_size=batch_size)
        write_jsonl_atomic(out, ({**r, key: s} for (_, r), s in zip(records, scores)))
        return scores
    flags = [safety_flag(r, where) for where, r in records]
    scorer = load_scorer(reward_model, safety_reward_model, dtype=dtype)
    got = scorer.score_responses(prompts, responses, flags, batch_size=batch_size)
    write_jsonl_atomic(out, ({**r, key: s, **got.item(i)}
                             for i, ((_, r), s) in enumerate(zip(records, got.rewards))))
    return got.rewards
