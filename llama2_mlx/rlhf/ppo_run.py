"""The PPO run (``ppo.py``'s iterations) in its output folder: held-out evaluations and
early stopping, checkpoints and exact resume, ``metrics.jsonl``, progress, the adapters.

The folder is an adapter folder (``llama2 generate --adapter-path OUT`` uses it):
``adapters.safetensors`` + ``adapter_config.json`` of the last checkpoint, ``best/`` the
adapters of the best held-out mean reward, ``checkpoints/step_NNNNNNN/`` (the iteration
number), ``metrics.jsonl`` ("ppo" records, one per iteration; "eval" records) and
``ppo.json`` (the settings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.nn as nn
from mlx.utils import tree_flatten

from llama2_mlx.errors import OptionError
from llama2_mlx.io.atomic import write_json_atomic
from llama2_mlx.io.outdir import Claim, claim_output
from llama2_mlx.io.progress import ProgressBar, log_stderr
from llama2_mlx.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, save_adapters
from llama2_mlx.rlhf.ppo import (
    PPOConfig,
    PPOResult,
    RewardFn,
    check_prompts,
    evaluate_heldout,
    make_loss,
    make_ppo_optimizer,
    policy_with_lora,
    ppo_iteration,
)
from llama2_mlx.training.checkpoint import (
    json_digest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from llama2_mlx.training.metrics import METRICS_FILE, MetricsLog
from llama2_mlx.training.trainer import restore_optimizer

SETTINGS_FILE = "ppo.json"
BEST = "best"
PPO_ARTEFACTS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "checkpoints", METRICS_FILE, BEST,
                 SETTINGS_FILE)
PPO_RESULTS = (ADAPTER_WEIGHTS, "checkpoints/step_*")


def claim_ppo_folder(out_dir, resume: bool, overwrite: bool, log):
    """``claim_output`` of a PPO run's folder (``--out``)."""
    return claim_output(out_dir, field="out", artefacts=PPO_ARTEFACTS, results=PPO_RESULTS,
                        resume=resume, overwrite=overwrite, continues="{resume}", say=log)


def ppo(policy, tokenizer, reward: RewardFn, prompts: Sequence[Sequence[dict]], out_dir,
        config: Optional[PPOConfig] = None, *, eval_prompts=None, safety_prompts=None,
        eval_safety_prompts=None, lora_config: Optional[LoRAConfig] = None,
        resume: bool = False, overwrite: bool = False, claim: Optional[Claim] = None,
        log: Callable[[str], None] = log_stderr) -> PPOResult:
    """Train ``policy``'s LoRA adapters with PPO for ``config.iterations`` iterations.

    ``reward(prompt, answers, is_safety_prompt)`` gives the probabilities R_c of K answers
    to one prompt (``ppo.scorer_reward`` of reward models). ``policy`` without LoRA layers
    gets new ones (``config.lora``, pi_0 = its base); with some (``lora_config`` describes
    them) they are trained further and pi_0 is the policy with them as they were.
    ``eval_prompts`` (default: ``prompts``) are the held-out prompts; the ``safety``
    flags mark the gate's safety prompts. ``resume`` continues the run in ``out_dir`` from
    its newest intact checkpoint, with the same results as an uninterrupted run.
    """
    config = config or PPOConfig()
    if claim is None:
        with claim_ppo_folder(out_dir, resume, overwrite, log) as claim:
            return ppo(policy, tokenizer, reward, prompts, out_dir, config,
                       eval_prompts=eval_prompts, safety_prompts=safety_prompts,
                       eval_safety_prompts=eval_safety_prompts, lora_config=lora_config,
                       resume=resume, claim=claim, log=log)
    flags = check_prompts(prompts, safety_prompts, "prompts")
    if eval_prompts is None:
        eval_prompts, eval_flags = prompts, flags
    else:
        eval_flags = check_prompts(eval_prompts, eval_safety_prompts, "held-out prompts")
    out = Path(out_dir)
    policy, lora_cfg, start = policy_with_lora(policy, config, lora_config)
    settings = {**config.settings(), "prompts": json_digest([list(prompts), flags]),
                "eval_prompts": json_digest([list(eval_prompts), eval_flags])}
    run = _Run(policy, tokenizer, reward, config, out, lora_cfg, start, claim, log, settings)
    run.begin(resume)
    return run.loop((list(prompts), flags), (list(eval_prompts), eval_flags))


class _Run:
    """One ``ppo`` call's state: the optimizer, the history, the early-stopping counters."""

    def __init__(self, policy, tokenizer, reward, config: PPOConfig, out: Path,
                 lora_cfg: LoRAConfig, start, claim: Claim, log, settings: dict):
        self.policy, self.tokenizer, self.reward, self.config = policy, tokenizer, reward, config
        self.out, self.lora_cfg, self.start, self.claim, self.say = out, lora_cfg, start, claim, log
        self.settings = settings
        self.optimizer = make_ppo_optimizer(config)
        self.loss_and_grad = nn.value_and_grad(policy, make_loss(config))
        self.result = PPOResult(out=out)
        self.done, self.best, self.bad_evals = 0, None, 0
        self.metrics = MetricsLog(out / METRICS_FILE)

    def begin(self, resume: bool) -> None:
        """A fresh run's settings file, or the resumed run's checkpoint restored."""
        root = self.out / "checkpoints"
        if not resume:
            if list_checkpoints(root):
                raise OptionError("{out}: {path} holds checkpoints of an earlier run; {resume} "
                                  "continues it", path=root)
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / SETTINGS_FILE, self.settings)
            self.metrics.restart(-1)
            return
        path, params, opt_state, state = load_checkpoint(root, say=self.say)
        old = state["fingerprint"]
        for key in sorted(set(old) | set(self.settings)):
            if old.get(key) != self.settings.get(key):
                raise OptionError("{resume}: {path} was made with {key} = {old}, this run has "
                                  "{new}", path=path, key=key, old=json.dumps(old.get(key)),
                                  new=json.dumps(self.settings.get(key)))
        self.policy.load_weights(list(params.items()), strict=False)
        restore_optimizer(self.optimizer, self.policy, opt_state)
        self.done = state["step"]
        self.result.history, self.result.evals = state["history"], state["evals"]
        self.result.stopped, self.best, self.bad_evals = (state["stopped"], state["best"],
                                                          state["bad_evals"])
        self.result.resumed_from = self.done
        self.metrics.restart(self.done)
        self.say(f"resuming {self.out.resolve()} after iteration {self.done} ({path.name})")

    def loop(self, prompts, eval_prompts) -> PPOResult:
        config, result = self.config, self.result
        if result.stopped is not None:
            self.say(f"the run stopped early at iteration {self.done}: {result.stopped}")
            return result
        with ProgressBar("ppo", config.iterations, ("reward {reward}", "kl {kl}"),
                         completed=self.done, enabled=config.progress, every=1) as bar:
            if self.done == 0:
                self._evaluate(0, eval_prompts, bar)
            for it in range(self.done + 1, config.iterations + 1):
                rec = ppo_iteration(self.policy, self.tokenizer, self.reward, *prompts, config,
                                    self.optimizer, self.loss_and_grad, it, self.start)
                result.history.append(rec)
                self.metrics.write("ppo", it, **{k: v for k, v in rec.items() if k != "iteration"},
                                   lr=config.lr)
                self._line(bar, f"iteration {it}: reward {rec['reward']:.4f}, KL {rec['kl']:.4f}, loss "
                        f"{rec['loss']:.4f}, clipped {rec['clip_fraction']:.1%} "
                        f"({rec['seconds']:.1f}s)")
                if it % config.val_every == 0 or it == config.iterations:
                    self._evaluate(it, eval_prompts, bar)
                bar.update(it, reward=f"{rec['reward']:.3f}", kl=f"{rec['kl']:.3f}")
                self.done = it
                if result.stopped or it % config.save_every == 0 or it == config.iterations:
                    self._checkpoint(it)
                if result.stopped:
                    self.say(f"stopped early after iteration {it}: {result.stopped}")
                    break
        return result

    def _line(self, bar, message: str) -> None:
        """A log line: above the progress bar when shown, else to ``log``."""
        (bar.log if self.config.progress else self.say)(message)

    def _evaluate(self, it: int, eval_prompts, bar) -> None:
        config, result = self.config, self.result
        rec = evaluate_heldout(self.policy, self.tokenizer, self.reward, *eval_prompts, config,
                               it, self.start)
        result.evals.append(rec)
        self.metrics.write("eval", it, **{k: v for k, v in rec.items() if k != "iteration"})
        self._line(bar, f"held-out after iteration {it}: mean reward {rec['eval_reward']:.4f}, "
                f"KL {rec['eval_kl']:.4f}")
        if self.best is None or rec["eval_reward"] > self.best["eval_reward"]:
            self.best, self.bad_evals = rec, 0
            save_adapters(self.policy, self.out / BEST, self.lora_cfg, iteration=it,
                          ppo=self.settings, held_out=rec)
        else:
            self.bad_evals += 1
        if config.patience and self.bad_evals >= config.patience:
            result.stopped = (f"no better held-out mean reward in {self.bad_evals} evaluations "
                              f"(best {self.best['eval_reward']:.4f} at iteration "
                              f"{self.best['iteration']}, adapters in {self.out / BEST})")
        elif config.kl_stop is not None and rec["eval_kl"] > config.kl_stop:
            result.stopped = (f"held-out KL {rec['eval_kl']:.4f} is above kl_stop "
                              f"{config.kl_stop:g}")

    def _checkpoint(self, it: int) -> None:
        result = self.result
        state = {"fingerprint": self.settings, "history": result.history, "evals": result.evals,
                 "stopped": result.stopped, "best": self.best, "bad_evals": self.bad_evals}
        params = dict(tree_flatten(self.policy.trainable_parameters()))
        save_checkpoint(self.out / "checkpoints", it, params, self.optimizer.state, state)
        save_adapters(self.policy, self.out, self.lora_cfg, iteration=it, ppo=self.settings)
        self.claim.commit()  # a checkpoint of this run: an earlier run set aside goes


def ppo_files(model, reward_model, prompts_file, out_dir, config: Optional[PPOConfig] = None,
              *, safety_reward_model=None, eval_prompts_file=None, adapter_path=None,
              dtype=None, resume: bool = False, overwrite: bool = False,
              log: Callable[[str], None] = log_stderr) -> PPOResult:
    """``ppo`` from files: the policy ``model`` [+ ``adapter_path``], the reward model
    folder (and a safety one: the gated reward), all on one base in memory, and prompt
    files (with their ``"safety"`` flags). The folder is claimed before any model loads."""
    from llama2_mlx.chat.records import read_flagged_prompts
    from llama2_mlx.rlhf.ppo import scorer_reward
    from llama2_mlx.rlhf.rejection import load_models

    config = config or PPOConfig()
    prompts, flags = read_flagged_prompts(prompts_file)
    eval_prompts = eval_flags = None
    if eval_prompts_file is not None:
        eval_prompts, eval_flags = read_flagged_prompts(eval_prompts_file)
    with claim_ppo_folder(out_dir, resume, overwrite, log) as claim:
        base, lora_config, rm, rm_tokenizer = load_models(model, adapter_path, reward_model,
                                                          dtype, log, safety_reward_model)
        from llama2_mlx.rlhf.gate import as_scorer

        policy, tokenizer = base.policy(adapter_path)
        return ppo(policy, tokenizer, scorer_reward(as_scorer(rm, rm_tokenizer)), prompts,
                   out_dir, config, eval_prompts=eval_prompts, safety_prompts=flags,
                   eval_safety_prompts=eval_flags, lora_config=lora_config, resume=resume,
                   claim=claim, log=log)
