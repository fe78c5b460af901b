"""``llama2 ppo``: a light PPO (§3.2.3) on LoRA adapters, one base in memory."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from cli.common import DATA as _D
from cli.common import SAMPLING as _S
from cli.common import TRAINING as _T
from cli.common import add_command, cli_errors, dtype_name, eprint, opt
from cli.options import AdapterOpt, DTypeOpt, ModelOpt, field_option, given
from llama2_mlx.rlhf.ppo import PRESETS, PPOConfig

_PPO = PPOConfig()  # the command's defaults (the paper's), which its options show

Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)


def _f(name: str, *flags: str):
    return field_option(_PPO, name, *flags, panel=_T)


@cli_errors
def ppo(
    model: ModelOpt,
    reward_model: Annotated[str, opt("Helpfulness reward model folder (reward-train); its "
                                     "probability is R_c.", _D, "--reward-model")],
    prompts: Annotated[str, opt("JSONL of training prompts (\"safety\": true marks a safety "
                                "prompt).", _D)],
    out: Annotated[str, opt("Output folder: the adapters (for generate --adapter-path), best/, "
                            "checkpoints/, metrics.jsonl.", _D)],
    eval_prompts: Annotated[Optional[str], opt(
        "Held-out prompts for the mean reward and KL and early stopping (default: --prompts).",
        _D)] = None,
    safety_reward_model: Annotated[Optional[str], opt(
        "Safety reward model folder: R_c is then the paper's gate of the two.", _D,
        "--safety-reward-model")] = None,
    adapter_path: AdapterOpt = None,
    preset: Annotated[Preset, opt("Settings to start from: llama2-ppo (the paper's, 7B/13B), "
                                  "llama2-ppo-70b (beta 0.005), demo (the bundled model); "
                                  "options given override them.")] = "llama2-ppo",
    iterations: Optional[int] = _f("iterations"),
    batch_size: Optional[int] = _f("batch_size"),
    minibatch_size: Optional[int] = _f("minibatch_size"),
    micro_batch_size: Optional[int] = _f("micro_batch_size"),
    k: Optional[int] = field_option(_PPO, "k", "-k", "--k", panel=_S),
    beta: Optional[float] = _f("beta"),
    ppo_clip: Optional[float] = _f("ppo_clip"),
    lr: Optional[float] = _f("lr"),
    weight_decay: Optional[float] = _f("weight_decay"),
    grad_clip: Optional[float] = _f("grad_clip"),
    val_every: Optional[int] = _f("val_every"),
    eval_k: Optional[int] = _f("eval_k"),
    patience: Optional[int] = _f("patience"),
    kl_stop: Optional[float] = _f("kl_stop"),
    save_every: Optional[int] = _f("save_every"),
    seed: Optional[int] = _f("seed"),
    temp: Optional[float] = field_option(_PPO.generation, "temp"),
    max_tokens: Optional[int] = field_option(_PPO.generation, "max_tokens"),
    rank: Optional[int] = field_option(_PPO.lora, "rank"),
    dtype: DTypeOpt = None,
    progress: Annotated[bool, opt("Show the progress bar (off a terminal: a line an "
                                  "iteration).", _T, "--progress/--no-progress")] = True,
    resume: Annotated[bool, opt("Continue the run in --out from its newest intact checkpoint.",
                                _T, "--resume")] = False,
    overwrite: Annotated[bool, opt("Replace an earlier run in --out (kept until this run's "
                                   "first checkpoint).", _T, "--overwrite")] = False,
) -> None:
    """PPO on LoRA adapters: K answers a prompt, reward whiten(logit(R_c)) - beta * KL to the
    starting policy, leave-one-out advantages (no value model), the clipped surrogate."""
    from pathlib import Path

    from llama2_mlx.rlhf.ppo import preset_config
    from llama2_mlx.rlhf.ppo_run import ppo_files

    options = given(iterations=iterations, batch_size=batch_size, minibatch_size=minibatch_size,
                    micro_batch_size=micro_batch_size, k=k, beta=beta, ppo_clip=ppo_clip, lr=lr,
                    weight_decay=weight_decay, grad_clip=grad_clip, val_every=val_every,
                    eval_k=eval_k, patience=patience, kl_stop=kl_stop, save_every=save_every,
                    seed=seed)
    generation = given(temp=temp, max_tokens=max_tokens)
    lora = given(rank=rank)
    config = preset_config(Preset(preset).value, **options, progress=progress,
                           **({"generation": generation} if generation else {}),
                           **({"lora": lora} if lora else {}))
    result = ppo_files(model, reward_model, prompts, out, config,
                       safety_reward_model=safety_reward_model, eval_prompts_file=eval_prompts,
                       adapter_path=adapter_path, dtype=dtype_name(dtype), resume=resume,
                       overwrite=overwrite, log=eprint)
    for e in result.evals:
        typer.echo(f"iteration {e['iteration']}: held-out mean reward {e['eval_reward']:.4f}, "
                   f"KL {e['eval_kl']:.4f}")
    if result.stopped:
        eprint(f"stopped early: {result.stopped}")
    eprint(f"adapters written to {Path(out).resolve()} (best held-out: {Path(out).resolve() / 'best'})")


def register(app: typer.Typer) -> None:
    add_command(app, "ppo", ppo)
