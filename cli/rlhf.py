"""The light RLHF loop: ``reward-train``, ``reward-eval``, ``reward-score``,
``rejection-sample`` and ``rs-loop``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from cli.common import DATA as _D
from cli.common import LORA as _P
from cli.common import TRAINING as _T
from cli.common import DType, cli_errors, dtype_name, eprint, opt

_S = "Sampling"


class Margin(str, Enum):
    small = "small"
    large = "large"
    none = "none"


class FineTune(str, Enum):
    lora = "lora"
    full = "full"


ModelOpt = Annotated[str, opt("Base model folder or Hugging Face repo id.", _D, "--model", "-m")]
RewardOpt = Annotated[str, opt("Reward model folder (written by reward-train).", _D, "--reward-model")]
AdapterOpt = Annotated[Optional[str], opt("LoRA adapters of the policy.", _D, "--adapter-path")]
DTypeOpt = Annotated[Optional[DType], opt("Compute dtype (default: the checkpoint's).", _D)]
SeedOpt = Annotated[int, opt("Random seed.")]
KOpt = Annotated[int, opt("Samples per prompt.", _S, "-k", "--k")]
TempOpt = Annotated[float, opt("Sampling temperature (the paper: 1.2-1.3 for RLHF models).", _S)]
TopPOpt = Annotated[float, opt("Nucleus sampling mass (1 = off).", _S)]
TopKOpt = Annotated[int, opt("Sample among the k most likely tokens (0 = off).", _S)]
MaxTokOpt = Annotated[int, opt("Most tokens per answer.", _S)]
RankOpt = Annotated[int, opt("LoRA rank.", _P)]
ScaleOpt = Annotated[float, opt("LoRA scale.", _P)]
LayersOpt = Annotated[int, opt("Adapt the last N layers (-1: all).", _P)]
KeysOpt = Annotated[Optional[str], opt("Comma-separated projections to adapt (q_proj,v_proj, attn, mlp) (default: all).", _P)]
BatchOpt = Annotated[int, opt("Pairs (reward) or rows (fine-tune) per micro-batch.")]
EpochsOpt = Annotated[Optional[float], opt("Epochs (default 1 unless --iters).")]
ItersOpt = Annotated[Optional[int], opt("Optimizer steps (instead of --epochs).")]
NoProgress = Annotated[bool, opt("Hide the progress bars.", _T, "--no-progress")]


def _gen(temp, top_p, top_k, max_tokens, seed):
    from llama2_mlx.generation.generate import GenerationConfig

    return GenerationConfig(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, seed=seed)


@cli_errors
def reward_train(
    model: ModelOpt, data: Annotated[str, opt("Folder with train.jsonl (and valid.jsonl; else 5% is held out) or one JSONL file.", _D)],
    out: Annotated[str, opt("Output folder of the reward model.", _D)],
    margin: Annotated[Margin, opt("Margin by rating (Table 27): small 1, 2/3, 1/3, 0; large 3, 2, 1, 0; none.", _D)] = Margin.small,
    fine_tune_type: Annotated[FineTune, opt("lora (frozen base) or full (tiny models).", _P)] = FineTune.lora,
    rank: RankOpt = 8, scale: ScaleOpt = 20.0, num_layers: LayersOpt = -1, keys: KeysOpt = None,
    lr: Annotated[Optional[float], opt("Peak learning rate (default: 1e-4 for LoRA, 1e-5 for full as in the paper).")] = None,
    epochs: EpochsOpt = None, iters: ItersOpt = None, batch_size: BatchOpt = 8,
    grad_accum: Annotated[int, opt("Micro-batches per optimizer step.")] = 1,
    warmup: Annotated[Optional[int], opt("Warmup steps (default: 3% of the steps, at least 5).")] = None,
    weight_decay: Annotated[float, opt("AdamW weight decay.")] = 0.1,
    clip: Annotated[float, opt("Clip gradients at this global norm (0: off).")] = 1.0,
    max_seq_len: Annotated[int, opt("Keep the last N tokens of longer sequences.", _D)] = 2048,
    eval_every: Annotated[int, opt("Held-out metrics every N steps (0: at the end only).")] = 50,
    save_every: Annotated[int, opt("Checkpoint every N steps (0: at the end only).")] = 100,
    resume: Annotated[bool, opt("Continue from the newest checkpoint in OUT/checkpoints.", _T, "--resume")] = False,
    grad_checkpoint: Annotated[bool, opt("Recompute activations in backward (less memory).", _T, "--grad-checkpoint")] = False,
    seed: SeedOpt = 0, dtype: DTypeOpt = None, no_progress: NoProgress = False,
) -> None:
    """Train a reward model on preference pairs (loss -log sigmoid(r_chosen - r_rejected - margin))."""
    from llama2_mlx.models.lora import LoRAConfig
    from llama2_mlx.rlhf.reward import (
        RewardTrainConfig,
        paper_train_config,
        train_reward_model,
    )

    train = paper_train_config(fine_tune_type.value, lr=lr, weight_decay=weight_decay, clip=clip,
                               grad_accum=grad_accum, epochs=epochs, iters=iters,
                               save_every=save_every, resume=resume, grad_checkpoint=grad_checkpoint,
                               seed=seed, progress=not no_progress)
    lora = LoRAConfig(rank, scale, 0.0, keys or LoRAConfig.keys, num_layers)
    config = RewardTrainConfig(train, fine_tune_type.value, lora, batch_size, warmup=warmup,
                               eval_every=eval_every, max_seq_len=max_seq_len, margin=margin.value)
    result = train_reward_model(model, data, out, config, dtype=dtype_name(dtype), log=eprint)
    typer.echo(f"held-out {result.final.summary()}")
    eprint(f"reward model written to {out}")


@cli_errors
def reward_eval(
    reward_model: RewardOpt,
    data: Annotated[str, opt("Preference JSONL file (or a folder's valid.jsonl).", _D)],
    margin: Annotated[Optional[Margin], opt("Margin scheme for the loss (default: the training one).", _D)] = None,
    batch_size: Annotated[int, opt("Sequences per batch.")] = 16, dtype: DTypeOpt = None,
) -> None:
    """Accuracy (r_chosen > r_rejected), mean reward gap and accuracy per rating on held-out pairs."""
    from llama2_mlx.rlhf.reward import evaluate_file

    m = evaluate_file(reward_model, data, margin=margin.value if margin else None,
                      batch_size=batch_size, dtype=dtype_name(dtype))
    typer.echo(f"accuracy {m.accuracy:.4f}\nmean reward gap {m.mean_gap:.4f}\nloss {m.loss:.4f}\npairs {m.n}")
    for rating, (acc, n) in m.per_rating.items():
        typer.echo(f"accuracy {rating} {acc:.4f} ({n} pairs)")


@cli_errors
def reward_score(
    reward_model: RewardOpt,
    data: Annotated[str, opt("JSONL of prompt + response (or messages ending with the answer).", _D)],
    out: Annotated[str, opt("Output JSONL: the records with a \"reward\" field.", _D)],
    batch_size: Annotated[int, opt("Sequences per batch.")] = 16, dtype: DTypeOpt = None,
) -> None:
    """Score prompt/response records with a reward model and write them out with their rewards."""
    from llama2_mlx.rlhf.reward import score_file

    scores = score_file(reward_model, data, out, batch_size=batch_size, dtype=dtype_name(dtype))
    eprint(f"scored {len(scores)} responses (mean reward {sum(scores) / len(scores):.4f}) -> {out}")


@cli_errors
def rejection_sample(
    model: ModelOpt, reward_model: RewardOpt,
    prompts: Annotated[str, opt("JSONL of prompts (prompt / messages / lora-train records).", _D)],
    out: Annotated[str, opt("Output JSONL of the best answers (lora-train format).", _D)],
    adapter_path: AdapterOpt = None,
    all_out: Annotated[Optional[str], opt("Also write all K answers with their rewards here.", _D)] = None,
    k: KOpt = 4, temp: TempOpt = 1.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0,
    max_tokens: MaxTokOpt = 256, seed: SeedOpt = 0, dtype: DTypeOpt = None,
    no_progress: NoProgress = False,
) -> None:
    """Sample K answers per prompt (one shared prefill, batched decoding), keep the highest-reward one."""
    from llama2_mlx.rlhf.rejection import RSConfig, rejection_sample_files

    config = RSConfig(k=k, generation=_gen(temp, top_p, top_k, max_tokens, seed))
    report = rejection_sample_files(model, reward_model, prompts, out, config,
                                    adapter_path=adapter_path, all_out=all_out,
                                    dtype=dtype_name(dtype), progress=not no_progress, log=eprint)
    typer.echo(f"mean best reward {report.mean_best:.4f}\nmean median reward {report.mean_median:.4f}")
    eprint(report.summary())


@cli_errors
def rs_loop(
    model: ModelOpt, reward_model: RewardOpt,
    prompts: Annotated[str, opt("JSONL of prompts to sample.", _D)],
    out: Annotated[str, opt("Output folder (iter_NN/ data and adapters, summary.jsonl).", _D)],
    iterations: Annotated[int, opt("Rounds of sample -> score -> fine-tune.")] = 1,
    adapter_path: AdapterOpt = None,
    eval_prompts: Annotated[Optional[str], opt("Held-out prompts for the mean greedy reward (default: --prompts).", _D)] = None,
    k: KOpt = 4, temp: TempOpt = 1.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0,
    max_tokens: MaxTokOpt = 256,
    sft_config: Annotated[Optional[str], opt("YAML/JSON file of lora-train options for the fine-tunes.")] = None,
    lr: Annotated[Optional[float], opt("Fine-tune peak learning rate (default: 1e-4).")] = None,
    epochs: EpochsOpt = None, iters: ItersOpt = None,
    batch_size: Annotated[Optional[int], opt("Fine-tune rows per micro-batch (default: 4).")] = None,
    max_seq_length: Annotated[Optional[int], opt("Fine-tune row length in tokens (default: 2048).")] = None,
    rank: Annotated[Optional[int], opt("LoRA rank of new adapters (default: 8).", _P)] = None,
    seed: SeedOpt = 0, dtype: DTypeOpt = None, no_progress: NoProgress = False,
    resume: Annotated[bool, opt("Continue the run in --out after its last finished iteration.", _T, "--resume")] = False,
) -> None:
    """Rejection sampling loop: each iteration fine-tunes on the pooled winners of all iterations."""
    from llama2_mlx.rlhf.rejection import RSConfig, RSLoopConfig, rs_loop_files
    from llama2_mlx.training.sft import SFTOptions

    cli = dict(lr=lr if lr is not None or sft_config else 1e-4, epochs=epochs, iters=iters,
               batch_size=batch_size, max_seq_length=max_seq_length, rank=rank, seed=seed,
               progress=not no_progress)
    sft = SFTOptions.resolve(cli, config_file=sft_config)
    config = RSLoopConfig(iterations, RSConfig(k, _gen(temp, top_p, top_k, max_tokens, seed)), sft)
    for s in rs_loop_files(model, reward_model, prompts, out, config, adapter_path=adapter_path,
                           eval_prompts_file=eval_prompts, dtype=dtype_name(dtype), resume=resume,
                           log=eprint):
        typer.echo(s.line())


def register(app: typer.Typer) -> None:
    app.command("reward-train")(reward_train)
    app.command("reward-eval")(reward_eval)
    app.command("reward-score")(reward_score)
    app.command("rejection-sample")(rejection_sample)
    app.command("rs-loop")(rs_loop)
