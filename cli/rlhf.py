"""The light RLHF loop: ``reward-train``, ``reward-eval``, ``reward-score``,
``rejection-sample`` and ``rs-loop``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from cli.common import DATA as _D
from cli.common import LORA as _P
from cli.common import TRAINING as _T
from cli.common import add_command, cli_errors, dtype_name, eprint, opt
from cli.options import (
    BATCH_SIZE,
    CLIP,
    EPOCHS,
    GRAD_ACCUM,
    GRAD_CHECKPOINT,
    ITERS,
    KEYS,
    LOG_EVERY,
    MAX_SEQ_LENGTH,
    NUM_LAYERS,
    OVERWRITE,
    PROGRESS,
    RANK,
    RESUME,
    RS_DEFAULTS,
    RS_K,
    RS_MAX_TOKENS,
    RS_SEED,
    RS_TEMP,
    RS_TOP_K,
    RS_TOP_P,
    SAVE_EVERY,
    SCALE,
    SEED,
    AdapterOpt,
    DTypeOpt,
    ModelOpt,
    NoProgressOpt,
    field_option,
    given,
)
from llama2_mlx.rlhf.reward import RewardTrainConfig
from llama2_mlx.rlhf.rs_loop import RSLoopConfig

# The commands' defaults, which their options show.
_REWARD = RewardTrainConfig()
_RS_SFT = RSLoopConfig().sft


class Margin(str, Enum):
    small = "small"
    large = "large"
    none = "none"


class FineTune(str, Enum):
    lora = "lora"
    full = "full"


class Kind(str, Enum):
    helpfulness = "helpfulness"
    safety = "safety"


RewardOpt = Annotated[str, opt("Reward model folder (written by reward-train).", _D, "--reward-model")]
SafetyRewardOpt = Annotated[Optional[str], opt(
    "Safety reward model folder (reward-train --kind safety): the reward is then the paper's "
    "gate, the safety score (a probability) for prompts with \"safety\": true or a safety "
    "score below 0.15, else the helpfulness one.", _D, "--safety-reward-model")]


def _sampling(k, **generation):
    """rejection sampling's options: RSConfig's defaults and what was given."""
    import dataclasses

    from llama2_mlx.rlhf.rejection import RSConfig

    gen = dataclasses.replace(RS_DEFAULTS.generation, **given(**generation))
    return RSConfig(**given(k=k), generation=gen)


def _abs(path) -> str:
    from pathlib import Path

    return str(Path(path).resolve())


@cli_errors
def reward_train(
    model: ModelOpt, data: Annotated[str, opt("Folder with train.jsonl (and valid.jsonl; else 5% is held out) or one JSONL file.", _D)],
    out: Annotated[str, opt("Output folder of the reward model.", _D)],
    margin: Optional[Margin] = field_option(_REWARD, "margin", panel=_D),
    kind: Optional[Kind] = field_option(_REWARD, "kind", panel=_D),
    fine_tune_type: Optional[FineTune] = field_option(_REWARD, "fine_tune_type", panel=_P),
    rank: Optional[int] = RANK, scale: Optional[float] = SCALE,
    num_layers: Optional[int] = NUM_LAYERS, keys: Optional[str] = KEYS,
    # The paper's rate depends on --fine-tune-type (paper_train_config).
    lr: Annotated[Optional[float], opt("Peak learning rate (default: 1e-4 for LoRA, 1e-5 for full as in the paper).")] = None,
    epochs: Optional[float] = EPOCHS, iters: Optional[int] = ITERS,
    batch_size: Optional[int] = field_option(_REWARD, "batch_size", panel=_T),
    grad_accum: Optional[int] = GRAD_ACCUM,
    warmup: Optional[int] = field_option(_REWARD, "warmup", panel=_T),
    weight_decay: Optional[float] = field_option(_REWARD.train, "weight_decay"),
    clip: Optional[float] = CLIP,
    max_seq_len: Optional[int] = field_option(_REWARD, "max_seq_len", "--max-seq-length", panel=_D),
    eval_every: Optional[int] = field_option(_REWARD, "eval_every", "--val-every", panel=_T),
    save_every: Optional[int] = SAVE_EVERY, resume: Optional[bool] = RESUME,
    overwrite: Optional[bool] = OVERWRITE, grad_checkpoint: Optional[bool] = GRAD_CHECKPOINT,
    seed: Optional[int] = SEED, dtype: DTypeOpt = None,
    progress: Optional[bool] = PROGRESS, log_every: Optional[int] = LOG_EVERY,
) -> None:
    """Train a reward model on preference pairs (loss -log sigmoid(r_chosen - r_rejected - margin))."""
    from llama2_mlx.models.lora import LoRAConfig
    from llama2_mlx.rlhf.reward import paper_train_config, train_reward_model

    lora = LoRAConfig(**given(rank=rank, scale=scale, num_layers=num_layers, keys=keys))
    config = RewardTrainConfig(lora=lora, **given(
        fine_tune_type=fine_tune_type, margin=margin, kind=kind, batch_size=batch_size, warmup=warmup,
        eval_every=eval_every, max_seq_len=max_seq_len))
    config.train = paper_train_config(
        config.fine_tune_type, lr=lr, weight_decay=weight_decay, clip=clip, grad_accum=grad_accum,
        epochs=epochs, iters=iters, save_every=save_every, resume=resume, overwrite=overwrite,
        grad_checkpoint=grad_checkpoint, seed=seed, progress=progress, log_every=log_every)
    result = train_reward_model(model, data, out, config, dtype=dtype_name(dtype), log=eprint)
    typer.echo(f"held-out {result.final.summary()}")
    eprint(f"reward model written to {_abs(out)}")


@cli_errors
def reward_eval(
    reward_model: RewardOpt,
    data: Annotated[str, opt("Preference JSONL file (or a folder's valid.jsonl).", _D)],
    margin: Annotated[Optional[Margin], opt("Margin scheme for the loss (default: the training one).", _D)] = None,
    batch_size: Annotated[int, opt("Sequences per batch.")] = 16, dtype: DTypeOpt = None,
) -> None:
    """Accuracy (r_chosen > r_rejected), mean reward gap and accuracy per rating (Table 28's
    buckets) on held-out pairs, for a helpfulness or a safety reward model."""
    from llama2_mlx.rlhf.gate import reward_kind
    from llama2_mlx.rlhf.reward import evaluate_file
    from llama2_mlx.rlhf.reward_model import read_reward_config

    m = evaluate_file(reward_model, data, margin=margin.value if margin else None,
                      batch_size=batch_size, dtype=dtype_name(dtype))
    typer.echo(f"accuracy {m.accuracy:.4f}\nmean reward gap {m.mean_gap:.4f}\nloss {m.loss:.4f}\npairs {m.n}")
    for rating, (acc, n) in m.per_rating.items():
        typer.echo(f"accuracy {rating} {acc:.4f} ({n} pairs)")
    typer.echo(f"kind {reward_kind(read_reward_config(reward_model))}")


@cli_errors
def reward_score(
    reward_model: RewardOpt,
    data: Annotated[str, opt("JSONL of prompt + response (or messages ending with the answer).", _D)],
    out: Annotated[str, opt("Output JSONL: the records with a \"reward\" field.", _D)],
    safety_reward_model: SafetyRewardOpt = None,
    batch_size: Annotated[int, opt("Sequences per batch.")] = 16, dtype: DTypeOpt = None,
) -> None:
    """Score prompt/response records with a reward model and write them out with their rewards."""
    from llama2_mlx.rlhf.reward import score_file

    scores = score_file(reward_model, data, out, batch_size=batch_size, dtype=dtype_name(dtype),
                        safety_reward_model=safety_reward_model)
    eprint(f"scored {len(scores)} responses (mean reward {sum(scores) / len(scores):.4f}) "
           f"-> {_abs(out)}")


@cli_errors
def rejection_sample(
    model: ModelOpt, reward_model: RewardOpt,
    prompts: Annotated[str, opt("JSONL of prompts (prompt / messages / lora-train records; "
                                "\"safety\": true marks a safety prompt).", _D)],
    out: Annotated[str, opt("Output JSONL of the best answers (lora-train format).", _D)],
    adapter_path: AdapterOpt = None, safety_reward_model: SafetyRewardOpt = None,
    all_out: Annotated[Optional[str], opt("Also write all K answers with their rewards here.", _D)] = None,
    k: Optional[int] = RS_K, temp: Optional[float] = RS_TEMP, top_p: Optional[float] = RS_TOP_P,
    top_k: Optional[int] = RS_TOP_K, max_tokens: Optional[int] = RS_MAX_TOKENS,
    seed: Optional[int] = RS_SEED, dtype: DTypeOpt = None, no_progress: NoProgressOpt = False,
) -> None:
    """Sample K answers per prompt (one shared prefill, batched decoding), keep the highest-reward one."""
    from llama2_mlx.rlhf.rejection import rejection_sample_files

    config = _sampling(k, temp=temp, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed)
    config.check()
    report = rejection_sample_files(model, reward_model, prompts, out, config,
                                    adapter_path=adapter_path, all_out=all_out,
                                    dtype=dtype_name(dtype), progress=not no_progress, log=eprint,
                                    safety_reward_model=safety_reward_model)
    typer.echo(f"mean best reward {report.mean_best:.4f}\nmean median reward {report.mean_median:.4f}")
    eprint(report.summary())


@cli_errors
def rs_loop(
    model: ModelOpt, reward_model: RewardOpt,
    prompts: Annotated[str, opt("JSONL of prompts to sample (\"safety\": true marks a safety prompt).", _D)],
    out: Annotated[str, opt("Output folder (iter_NN/ data and adapters, summary.jsonl).", _D)],
    iterations: Annotated[int, opt("Rounds of sample -> score -> fine-tune.")] = 1,
    adapter_path: AdapterOpt = None, safety_reward_model: SafetyRewardOpt = None,
    eval_prompts: Annotated[Optional[str], opt("Held-out prompts for the mean greedy reward (default: --prompts).", _D)] = None,
    k: Optional[int] = RS_K, temp: Optional[float] = RS_TEMP, top_p: Optional[float] = RS_TOP_P,
    top_k: Optional[int] = RS_TOP_K, max_tokens: Optional[int] = RS_MAX_TOKENS,
    sft_config: Annotated[Optional[str], opt("YAML/JSON file of lora-train options for the fine-tunes.")] = None,
    lr: Optional[float] = field_option(_RS_SFT.train, "lr"),
    epochs: Optional[float] = EPOCHS, iters: Optional[int] = ITERS,
    batch_size: Optional[int] = BATCH_SIZE, max_seq_length: Optional[int] = MAX_SEQ_LENGTH,
    rank: Optional[int] = RANK, seed: Optional[int] = SEED, dtype: DTypeOpt = None,
    progress: Optional[bool] = PROGRESS, log_every: Optional[int] = LOG_EVERY,
    resume: Annotated[bool, opt("Continue the run in --out after its last finished iteration.", _T, "--resume")] = False,
    overwrite: Annotated[bool, opt("Replace an earlier run in --out (kept until this run's first fine-tuned iteration).", _T, "--overwrite")] = False,
) -> None:
    """Rejection sampling loop: each iteration fine-tunes on the pooled winners of all iterations."""
    from llama2_mlx.rlhf.rs_loop import FINETUNE_DEFAULTS, rs_loop_files
    from llama2_mlx.training.sft import SFTOptions

    # The fine-tune options are None unless given, so that --sft-config can set them.
    cli = given(lr=lr, epochs=epochs, iters=iters, batch_size=batch_size,
                max_seq_length=max_seq_length, rank=rank, seed=seed, progress=progress,
                log_every=log_every)
    sft = SFTOptions.resolve(cli, config_file=sft_config, defaults=FINETUNE_DEFAULTS,
                             config_option="sft_config")
    # One seed for the run: sampling and the fine-tunes.
    rs = _sampling(k, temp=temp, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                   seed=sft.train.seed)
    rs.check()
    for s in rs_loop_files(model, reward_model, prompts, out, RSLoopConfig(iterations, rs, sft),
                           adapter_path=adapter_path, eval_prompts_file=eval_prompts,
                           dtype=dtype_name(dtype), resume=resume, overwrite=overwrite,
                           log=eprint, safety_reward_model=safety_reward_model):
        typer.echo(s.line())


def register(app: typer.Typer) -> None:
    add_command(app, "reward-train", reward_train)
    add_command(app, "reward-eval", reward_eval)
    add_command(app, "reward-score", reward_score)
    add_command(app, "rejection-sample", rejection_sample)
    add_command(app, "rs-loop", rs_loop)
