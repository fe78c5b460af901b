"""A light PPO (Touvron et al. 2023, §3.2.3) on one base in memory.

The policy is LoRA on the base; the reference policy pi_0 is the same model with its
adapters disabled (``lora.disabled_adapters``; when the run starts from adapters, with
those starting adapters swapped in): no second copy. The reward models load on the same
base (``gate.load_scorer(shared=...)``).

Each iteration samples ``batch_size`` answers: ``batch_size / k`` prompts, ``k`` answers
each sharing one prefill (``sample_k``); scores them (``R_c``, a probability); computes
each answer's per-token log-probabilities under pi and pi_0 (one forward of prompt +
answer, the answer tokens masked in); the reward ``whiten(logit(R_c)) - beta * KL``;
the advantages; then one AdamW step per minibatch of ``minibatch_size`` answers on PPO's
clipped surrogate (``ppo_loss``).

The departure from the paper: the paper trains a value model for its advantages; here
an answer's advantage is its reward minus the mean reward of the prompt's other K - 1
answers (a leave-one-out group baseline), so there is no value model to train or hold.

Held-out prompts: every ``val_every`` iterations (and at the start and the end), the
mean reward and KL of ``eval_k`` sampled answers per prompt (the same seeds each time);
early stopping on them (``patience``, ``kl_stop``); ``best/`` keeps the adapters of the
best held-out reward. Checkpoints (LoRA matrices, optimizer state, iteration, history)
resume a run exactly: every random draw is seeded from the seed and the iteration.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from llama2_mlx.chat.records import cut_answer
from llama2_mlx.errors import SEED_RANGE, Llama2Error, OptionError, check_fields
from llama2_mlx.generation.generate import GenerationConfig, sample_k
from llama2_mlx.models.lora import (
    LoRAConfig,
    adapter_weights,
    apply_lora,
    disabled_adapters,
    lora_layers,
    train_lora_only,
)
from llama2_mlx.models.model import eval_mode
from llama2_mlx.rlhf.ppo_loss import (
    answer_batch,
    clipped_surrogate,
    leave_one_out,
    logit,
    ppo_rewards,
    token_kl,
    token_logprobs,
)
from llama2_mlx.rlhf.rejection import prompt_seed, safety_flags
from llama2_mlx.training.schedule import lr_schedule, make_optimizer

# R_c of K answers to one prompt: (prompt messages, answer texts, safety prompt) -> probabilities.
RewardFn = Callable[[list, list, bool], Sequence[float]]
EVAL_SALT = 0x5EED  # the held-out samples' seeds differ from every iteration's


@dataclass
class PPOConfig:
    """A PPO run's settings; the defaults are the paper's (§3.2.3) where it gives them.

    A field's ``help`` is its ``ppo`` option's help text; the ranges are checked."""

    iterations: int = field(default=200, metadata={
        "help": "PPO iterations (the paper: 200-400, with early stopping).", "min": 1})
    batch_size: int = field(default=512, metadata={
        "help": "Answers sampled per iteration (batch-size / k prompts).", "min": 2})
    minibatch_size: int = field(default=64, metadata={
        "help": "Answers per gradient step (one step per minibatch).", "min": 1})
    micro_batch_size: Optional[int] = field(default=None, metadata={
        "help": "Answers per forward pass within a minibatch, gradients summed (default: "
                "the whole minibatch).", "min": 1})
    k: int = field(default=4, metadata={
        "help": "Answers per prompt (one prefill); each one's baseline is the mean reward "
                "of the others.", "min": 2})
    beta: float = field(default=0.01, metadata={
        "help": "KL penalty (the paper: 0.01 for 7B/13B, 0.005 for 34B/70B).", "min": 0})
    ppo_clip: float = field(default=0.2, metadata={
        "help": "PPO clip threshold of the probability ratio.", "above": 0, "below": 1})
    lr: float = field(default=1e-6, metadata={"help": "Constant learning rate.", "above": 0})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay.", "min": 0})
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = field(default=1e-5, metadata={"above": 0})
    grad_clip: float = field(default=1.0, metadata={
        "help": "Clip gradients at this global norm (0: off).", "min": 0})
    val_every: int = field(default=10, metadata={
        "help": "Held-out mean reward and KL every N iterations.", "min": 1})
    eval_k: Optional[int] = field(default=None, metadata={
        "help": "Answers sampled per held-out prompt (default: -k).", "min": 1})
    patience: int = field(default=0, metadata={
        "help": "Stop after N held-out evaluations without a better mean reward (0: off).",
        "min": 0})
    kl_stop: Optional[float] = field(default=None, metadata={
        "help": "Stop when the held-out KL (nats per answer) is above this (default: off).",
        "above": 0})
    save_every: int = field(default=1, metadata={
        "help": "Checkpoint every N iterations.", "min": 1})
    seed: int = field(default=0, metadata={
        "help": "Random seed (prompt order, sampling, LoRA initialization).", **SEED_RANGE})
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_tokens=256, temp=1.0))
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    progress: bool = True

    def __post_init__(self):
        check_fields(self)
        self.generation.check()
        if self.generation.temp <= 0:
            raise OptionError("{temp} must be above 0: PPO samples from the policy (got {got})",
                              got=self.generation.temp)
        if self.batch_size % self.k:
            raise OptionError("{batch_size} {b} is not a multiple of {k} {kk} (answers per "
                              "prompt)", b=self.batch_size, kk=self.k)
        if self.minibatch_size > self.batch_size:
            raise OptionError("{minibatch_size} {m} is above {batch_size} {b}",
                              m=self.minibatch_size, b=self.batch_size)
        if self.micro_batch_size is not None and self.micro_batch_size > self.minibatch_size:
            raise OptionError("{micro_batch_size} {m} is above {minibatch_size} {b}",
                              m=self.micro_batch_size, b=self.minibatch_size)

    @property
    def prompts_per_iteration(self) -> int:
        return self.batch_size // self.k

    def settings(self) -> dict:
        """What a resumed run must share with its checkpoints (all but the length and
        the progress display)."""
        d = dataclasses.asdict(self)
        for key in ("iterations", "progress"):
            d.pop(key)
        d["betas"] = list(self.betas)
        d["lora"]["keys"] = list(self.lora.keys)
        return d


# Named settings (``--preset``); options given with a preset override it.
PRESETS: dict[str, dict] = {
    "llama2-ppo": {},  # the paper's, for 7B and 13B
    "llama2-ppo-70b": {"beta": 0.005},  # the paper's for 34B and 70B
    # The bundled demo model, in seconds on a CPU (a larger step and a short answer).
    "demo": {"iterations": 8, "batch_size": 32, "minibatch_size": 8, "k": 4, "lr": 5e-4,
             "val_every": 1, "generation": {"max_tokens": 12}, "lora": {"rank": 4}},
}


def preset_config(name: str = "llama2-ppo", **options) -> PPOConfig:
    """The ``PPOConfig`` of preset ``name`` with ``options`` (fields; ``generation`` and
    ``lora`` as dicts of their fields) on top."""
    if name not in PRESETS:
        raise OptionError("{preset} must be one of {names} (got {got!r})",
                          names=", ".join(PRESETS), got=name)
    merged = {**PRESETS[name]}
    for key, value in options.items():
        if key in ("generation", "lora"):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    generation = dataclasses.replace(PPOConfig().generation, **merged.pop("generation", {}))
    lora = LoRAConfig(**merged.pop("lora", {}))
    return PPOConfig(**merged, generation=generation, lora=lora)


def scorer_reward(scorer, batch_size: int = 16) -> RewardFn:
    """The ``RewardFn`` of a ``gate.RewardScorer``: the gated probability R_c with two
    reward models; with one, its probability (``sigmoid`` of its output)."""
    def reward(prompt, answers, is_safety_prompt):
        s = scorer.score_answers(prompt, answers, is_safety_prompt, batch_size=batch_size)
        return s.rewards if scorer.gated else s.helpfulness

    return reward


def iteration_prompts(n: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """The prompts of ``iteration`` (1, 2, ...): the next ``per_iteration`` of a sequence
    of epochs, each a permutation of the ``n`` prompts drawn from ``seed`` and its number."""
    out = []
    for s in range((iteration - 1) * per_iteration, iteration * per_iteration):
        epoch = s // n
        out.append(int(np.random.RandomState((seed + epoch) % 2**32).permutation(n)[s % n]))
    return out


@contextmanager
def reference_policy(policy: nn.Module, start: Optional[dict]):
    """``policy`` as pi_0 inside the block: its adapters disabled, or with ``start`` (the
    starting adapters' matrices, when the run began from adapters) swapped in."""
    if start is None:
        with disabled_adapters(policy):
            yield policy
        return
    now = adapter_weights(policy)
    policy.load_weights(list(start.items()), strict=False)
    try:
        yield policy
    finally:
        policy.load_weights(list(now.items()), strict=False)


@dataclass
class Group:
    """K sampled answers to one prompt: their token ids (EOS included when sampled), texts,
    rewards R_c, per-token log-probabilities under the policy and under pi_0 and the exact
    KL of each next-token distribution."""

    prompt_ids: list[int]
    answers: list[list[int]]
    texts: list[str]
    r_c: np.ndarray
    logp: list[np.ndarray] = field(default_factory=list)
    ref_logp: list[np.ndarray] = field(default_factory=list)
    token_kl: list[np.ndarray] = field(default_factory=list)

    @property
    def kl(self) -> np.ndarray:
        """Each answer's sampled KL estimate (``sequence_kl``): the penalty."""
        return np.array([float((a - b).sum()) for a, b in zip(self.logp, self.ref_logp)])

    @property
    def exact_kl(self) -> np.ndarray:
        """Each answer's summed exact next-token KLs (``token_kl``): reported."""
        return np.array([float(x.sum()) for x in self.token_kl])


def answer_logprobs(model, prompts, answers, temp: float, chunk: int,
                    start: Optional[dict]) -> tuple[list, list, list]:
    """Per answer: its tokens' log-probabilities under ``model`` and under pi_0
    (``reference_policy``), and the exact KL of each next-token distribution
    (``token_kl``), all at temperature ``temp``; ``chunk`` prompt + answer rows a forward."""
    logp, ref, kl = [], [], []
    with eval_mode(model):
        for i in range(0, len(answers), chunk):
            p, a = prompts[i:i + chunk], answers[i:i + chunk]
            inputs, targets, _ = answer_batch(p, a)
            logits = model(inputs)
            with reference_policy(model, start):
                ref_logits = model(inputs)
            parts = [np.array(x) for x in (token_logprobs(logits, targets, temp),
                                           token_logprobs(ref_logits, targets, temp),
                                           token_kl(logits, ref_logits, temp))]
            for j, (pj, aj) in enumerate(zip(p, a)):
                cut = slice(len(pj) - 1, len(pj) - 1 + len(aj))
                for out, x in zip((logp, ref, kl), parts):
                    out.append(x[j, cut])
    return logp, ref, kl


def sample_groups(policy, tokenizer, reward: RewardFn, prompts, flags, k: int,
                  gen: GenerationConfig, seeds: Sequence[int], chunk: int,
                  start: Optional[dict]) -> list[Group]:
    """K answers to each prompt (prompt ``j`` sampled with ``seeds[j]``), scored, with
    their log-probabilities under the policy and pi_0."""
    gen = dataclasses.replace(gen, seed=None)
    groups = []
    with eval_mode(policy):
        for prompt, flag, seed in zip(prompts, flags, seeds):
            ids = tokenizer.encode_chat(list(prompt))
            mx.random.seed(seed)
            outs, eos = sample_k(policy, ids, k, gen, tokenizer.eos_id, tokenizer.vocab_size)
            answers = [list(o) + ([tokenizer.eos_id] if e else []) for o, e in zip(outs, eos)]
            texts = [cut_answer(tokenizer.decode(o))[0].strip() for o in outs]
            r = np.asarray(reward(list(prompt), texts, flag), np.float64)
            if r.shape != (k,) or not np.all((r >= 0) & (r <= 1)):
                raise Llama2Error(f"the reward must be {k} probabilities in [0, 1], got {r!r}")
            groups.append(Group(ids, answers, texts, r))
    rows = [(g.prompt_ids, a) for g in groups for a in g.answers]
    ps, ans = [r[0] for r in rows], [r[1] for r in rows]
    logp, ref, kl = answer_logprobs(policy, ps, ans, gen.temp, chunk, start)
    for j, g in enumerate(groups):
        g.logp, g.ref_logp = logp[j * k:(j + 1) * k], ref[j * k:(j + 1) * k]
        g.token_kl = kl[j * k:(j + 1) * k]
    return groups


def spread(values: Sequence[np.ndarray], prompts, width: int) -> mx.array:
    """Per-answer values placed at their answer positions of an ``answer_batch`` layout."""
    out = np.zeros((len(values), width), np.float32)
    for i, (v, p) in enumerate(zip(values, prompts)):
        out[i, len(p) - 1:len(p) - 1 + len(v)] = v
    return mx.array(out)


def ppo_step(policy, optimizer, rows, config: PPOConfig, loss_and_grad) -> dict:
    """One gradient step on a minibatch: ``rows`` of (prompt ids, answer ids, old logp,
    advantage); micro-batches' gradients of the token-summed loss summed, then divided by
    the minibatch's answer tokens."""
    chunk = config.micro_batch_size or len(rows)
    grads, total, count, clipped = None, 0.0, 0, 0.0
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        prompts = [r[0] for r in part]
        inputs, targets, mask = answer_batch(prompts, [r[1] for r in part])
        old = spread([r[2] for r in part], prompts, mask.shape[1])
        adv = mx.array([r[3] for r in part], mx.float32)
        (s, (n, c)), g = loss_and_grad(policy, inputs, targets, mask, old, adv)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(grads, s, n, c)
        total, count, clipped = total + s.item(), count + int(n.item()), clipped + c.item()
    grads = tree_map(lambda x: x / max(count, 1), grads)
    if config.grad_clip > 0:
        grads, norm = optim.clip_grad_norm(grads, config.grad_clip)
    else:
        norm = mx.sqrt(sum(mx.sum(x.astype(mx.float32) ** 2) for _, x in tree_flatten(grads)))
    norm = norm.item()
    loss = total / max(count, 1)
    if not (np.isfinite(loss) and np.isfinite(norm)):
        raise Llama2Error(f"PPO diverged: loss {loss}, gradient norm {norm}; stopped before "
                          "the update")
    optimizer.update(policy, grads)
    mx.eval(policy.parameters(), optimizer.state)
    return {"loss": loss, "grad_norm": norm, "clipped": clipped, "tokens": count}


def make_loss(config: PPOConfig):
    """The minibatch loss of ``policy``: (clipped surrogate sum, (tokens, clipped tokens))."""
    temp, clip = config.generation.temp, config.ppo_clip

    def loss(policy, inputs, targets, mask, old, adv):
        logp = token_logprobs(policy(inputs), targets, temp)
        s, n, c = clipped_surrogate(logp, old, adv, mask, clip)
        return s, (n, c)

    return loss


@dataclass
class PPOResult:
    """What a run did: one record per iteration, the held-out evaluations, why it stopped
    early (None: it ran all its iterations), the iteration it resumed from, the folder."""

    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    stopped: Optional[str] = None
    resumed_from: Optional[int] = None
    out: Optional[Path] = None

    @property
    def best(self) -> Optional[dict]:
        return max(self.evals, key=lambda e: e["eval_reward"]) if self.evals else None


def policy_with_lora(policy, config: PPOConfig, lora_config: Optional[LoRAConfig]):
    """(the policy with trainable LoRA layers, their config, the starting adapters' matrices
    when it had some: pi_0's; else None)."""
    if lora_layers(policy):
        if lora_config is None:
            raise ValueError("the policy has LoRA layers: pass their LoRAConfig")
        train_lora_only(policy)
        return policy, lora_config, dict(adapter_weights(policy))
    mx.random.seed(config.seed)
    apply_lora(policy, config.lora)
    return policy, config.lora, None


def make_ppo_optimizer(config: PPOConfig) -> optim.AdamW:
    """AdamW (betas, eps, weight decay of ``config``) at the constant learning rate."""
    return make_optimizer(config, lr_schedule(config.lr, config.iterations, kind="constant"))


def check_prompts(prompts, flags, what: str) -> list[bool]:
    if not prompts:
        raise Llama2Error(f"no {what}")
    return safety_flags(prompts, flags)


def ppo_iteration(policy, tokenizer, reward: RewardFn, prompts, flags, config: PPOConfig,
                  optimizer, loss_and_grad, it: int, start: Optional[dict]) -> dict:
    """Iteration ``it``: sample and score, the rewards and advantages, one gradient step per
    minibatch. Returns its record."""
    tic = time.perf_counter()
    idx = iteration_prompts(len(prompts), config.prompts_per_iteration, config.seed, it)
    seeds = [prompt_seed(config.seed + it, j) for j in range(len(idx))]
    chunk = config.micro_batch_size or config.minibatch_size
    groups = sample_groups(policy, tokenizer, reward, [prompts[i] for i in idx],
                           [flags[i] for i in idx], config.k, config.generation, seeds, chunk,
                           start)
    r_c = np.concatenate([g.r_c for g in groups])
    kl = np.concatenate([g.kl for g in groups])
    adv = leave_one_out(ppo_rewards(r_c, kl, config.beta), config.k)
    rows = [(g.prompt_ids, a, lp, 0.0) for g in groups for a, lp in zip(g.answers, g.logp)]
    rows = [(p, a, lp, float(x)) for (p, a, lp, _), x in zip(rows, adv)]
    order = np.random.RandomState((config.seed * 7919 + it) % 2**32).permutation(len(rows))
    steps = []
    policy.train()
    for i in range(0, len(rows), config.minibatch_size):
        mx.random.seed(prompt_seed(config.seed + it, 1_000 + i))  # LoRA dropout, if any
        steps.append(ppo_step(policy, optimizer, [rows[j] for j in order[i:i + config.minibatch_size]],
                              config, loss_and_grad))
    policy.eval()
    tokens = sum(s["tokens"] for s in steps)
    return {"iteration": it, "reward": float(r_c.mean()), "score": float(logit(r_c).mean()),
            "kl": float(np.mean([g.exact_kl.mean() for g in groups])),
            "kl_sampled": float(kl.mean()), "loss": float(np.mean([s["loss"] for s in steps])),
            "clip_fraction": sum(s["clipped"] for s in steps) / max(tokens, 1),
            "grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
            "answer_tokens": float(np.mean([len(r[1]) for r in rows])),
            "steps": len(steps), "seconds": round(time.perf_counter() - tic, 3)}


def evaluate_heldout(policy, tokenizer, reward: RewardFn, prompts, flags, config: PPOConfig,
                     it: int, start: Optional[dict]) -> dict:
    """Mean reward R_c and KL of ``eval_k`` answers to each held-out prompt (the same seeds
    at every evaluation)."""
    k = config.eval_k or config.k
    seeds = [prompt_seed(config.seed ^ EVAL_SALT, j) for j in range(len(prompts))]
    groups = sample_groups(policy, tokenizer, reward, prompts, flags, k, config.generation,
                           seeds, config.micro_batch_size or config.minibatch_size, start)
    return {"iteration": it, "eval_reward": float(np.mean([g.r_c.mean() for g in groups])),
            "eval_kl": float(np.mean([g.exact_kl.mean() for g in groups])),
            "eval_kl_sampled": float(np.mean([g.kl.mean() for g in groups])),
            "eval_answer_tokens": float(np.mean([len(a) for g in groups for a in g.answers]))}
