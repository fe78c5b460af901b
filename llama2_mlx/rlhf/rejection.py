"""Rejection sampling (Touvron et al. 2023, §3.2.3) and its loop.

For every prompt, K answers are drawn from the policy (the prompt prefilled
once, its KV cache shared by the K samples, which decode as one batch), each
is scored by the reward model on the chat encoding of prompt + answer, and the
best one becomes the prompt's new gold answer, written as JSONL that
``lora-train`` reads directly (``{"messages": [..., {"role": "assistant", ...}]}``).

``rs_loop`` repeats sample -> score -> fine-tune; each iteration fine-tunes the
starting policy on the winners of *all* iterations so far (the paper found
that training on the last iteration's winners alone regressed).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import mlx.core as mx

from llama2_mlx.chat.tokenizer import SPECIAL_TAGS
from llama2_mlx.errors import Llama2Error
from llama2_mlx.generation.generate import GenerationConfig, batch_generate, sample_k
from llama2_mlx.io.atomic import write_json_atomic, write_jsonl_atomic
from llama2_mlx.io.progress import ProgressBar, log_stderr
from llama2_mlx.io.readers import read_json, read_jsonl
from llama2_mlx.rlhf.reward_data import encode_response, prompt_messages
from llama2_mlx.rlhf.reward_model import (
    RewardModel,
    score_sequences,
    score_shared_prefix,
)

if TYPE_CHECKING:
    from llama2_mlx.training.sft import SFTOptions


def read_prompts(path) -> list[list[dict]]:
    """Prompts of a JSONL file as chat messages ending with a user turn: records with a
    ``"prompt"`` (string or messages, optional ``"system"``) or ``"messages"`` (a trailing
    assistant turn, as in ``lora-train`` data, is dropped), or bare JSON strings."""
    prompts = []
    for n, rec in read_jsonl(path, strings=True):
        where = f"{path} line {n}"
        msgs = rec.get("messages")
        if "prompt" not in rec and isinstance(msgs, list) and msgs \
                and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            rec = {"messages": msgs[:-1]}
        prompts.append(prompt_messages(rec, where))
    return prompts


@dataclass
class RSConfig:
    """K samples per prompt drawn with ``generation`` (temperature, top-p, max tokens...;
    its seed seeds the whole run); ``score_batch_size`` sequences per reward batch."""

    k: int = 4
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_tokens=256, temp=1.0, top_p=1.0))
    score_batch_size: int = 16

    def check(self) -> None:
        if self.k < 1:
            raise Llama2Error(f"-k must be at least 1 (got {self.k})")
        if self.score_batch_size < 1:
            raise Llama2Error(f"--score-batch-size must be at least 1 (got {self.score_batch_size})")
        self.generation.check()


@dataclass
class PromptSamples:
    """The K answers to one prompt, their rewards, whether each ended with EOS (rather
    than at max_tokens), and the index of the best one."""

    prompt: list[dict]
    texts: list[str]
    rewards: list[float]
    finished: list[bool]
    best: int

    @property
    def best_reward(self) -> float:
        return self.rewards[self.best]

    @property
    def median_reward(self) -> float:
        return float(statistics.median(self.rewards))

    def winner_record(self) -> dict:
        """The best answer as a ``lora-train`` record (plus its reward)."""
        answer = {"role": "assistant", "content": self.texts[self.best]}
        return {"messages": self.prompt + [answer], "reward": self.best_reward}

    def all_record(self) -> dict:
        """The prompt, all K answers with their rewards, and the index of the best."""
        return {
            "messages": self.prompt, "best": self.best,
            "samples": [{"text": t, "reward": r, "finished": f}
                        for t, r, f in zip(self.texts, self.rewards, self.finished)],
        }


@dataclass
class RSReport:
    """Every prompt's samples; the paper's max-vs-median figures and timings."""

    results: list[PromptSamples]
    seconds: float = 0.0
    sample_seconds: float = 0.0
    score_seconds: float = 0.0
    generated_tokens: int = 0

    @property
    def mean_best(self) -> float:
        return float(sum(r.best_reward for r in self.results) / len(self.results))

    @property
    def mean_median(self) -> float:
        return float(sum(r.median_reward for r in self.results) / len(self.results))

    @property
    def unfinished(self) -> int:
        return sum(not f for r in self.results for f in r.finished)

    def summary(self) -> str:
        """One line: prompts, K, mean best and median reward, their gap, time."""
        k = len(self.results[0].texts) if self.results else 0
        return (f"{len(self.results)} prompts x {k} samples: mean best reward {self.mean_best:.4f}, "
                f"mean median reward {self.mean_median:.4f} (gap {self.mean_best - self.mean_median:.4f}); "
                f"{self.unfinished} samples hit max-tokens; {self.generated_tokens} tokens in "
                f"{self.seconds:.1f}s (sampling {self.sample_seconds:.1f}s, scoring {self.score_seconds:.1f}s)")


def _cut_at_tags(text: str) -> tuple[str, bool]:
    # As in chat: an answer ends at a chat-format tag (it could not be encoded otherwise).
    at = min((i for i in (text.find(t) for t in SPECIAL_TAGS) if i >= 0), default=-1)
    return (text[:at].strip(), True) if at >= 0 else (text.strip(), False)


def _pick_best(rewards: Sequence[float], finished: Sequence[bool]) -> int:
    # An answer cut off at max-tokens is a winner only if no answer finished.
    pool = [i for i, f in enumerate(finished) if f] or list(range(len(rewards)))
    return max(pool, key=lambda i: rewards[i])


def rejection_sample(
    policy, tokenizer, rm: RewardModel, rm_tokenizer, prompts: Sequence[Sequence[dict]],
    config: Optional[RSConfig] = None, *, progress: bool = True,
) -> RSReport:
    """Sample ``config.k`` answers per prompt with ``sample_k`` (one prefill, K-row batched
    decoding), score each answer with ``rm`` (on ``rm_tokenizer``'s chat encoding of prompt
    + answer, EOS included; the shared prompt is run once there too, see
    ``score_shared_prefix``) and pick the best (among the answers that ended with EOS,
    when any did)."""
    config = config or RSConfig()
    config.check()
    if not prompts:
        raise Llama2Error("no prompts to sample")
    gen = dataclasses.replace(config.generation, seed=None)
    if config.generation.seed is not None:
        mx.random.seed(config.generation.seed)
    was_training = policy.training
    policy.eval()
    report = RSReport([])
    tic = time.perf_counter()
    try:
        with ProgressBar("rejection-sample", len(prompts), ("best {best}", "median {median}"),
                         enabled=progress) as bar:
            for n, prompt in enumerate(prompts, 1):
                prompt = list(prompt)
                t0 = time.perf_counter()
                outs, eos = sample_k(policy, tokenizer.encode_chat(prompt), config.k, gen,
                                     tokenizer.eos_id, tokenizer.vocab_size)
                t1 = time.perf_counter()
                texts, cut = zip(*(_cut_at_tags(tokenizer.decode(o)) for o in outs))
                finished = [e or c for e, c in zip(eos, cut)]
                seqs = [encode_response(rm_tokenizer, prompt, t, rm.max_len)
                        for t in texts]
                rewards = score_shared_prefix(rm, seqs, batch_size=config.score_batch_size)
                report.sample_seconds += t1 - t0
                report.score_seconds += time.perf_counter() - t1
                report.generated_tokens += sum(len(o) for o in outs)
                report.results.append(PromptSamples(prompt, list(texts), rewards, finished,
                                                    _pick_best(rewards, finished)))
                bar.update(n, best=f"{report.mean_best:.3f}", median=f"{report.mean_median:.3f}")
    finally:
        policy.train(was_training)
    report.seconds = time.perf_counter() - tic
    return report


def write_report(report: RSReport, out, all_out=None) -> None:
    """Write the winners (``lora-train`` JSONL) to ``out`` and, with ``all_out``, every
    sample with its reward; both atomically."""
    write_jsonl_atomic(out, (r.winner_record() for r in report.results))
    if all_out is not None:
        write_jsonl_atomic(all_out, (r.all_record() for r in report.results))


def greedy_rewards(policy, tokenizer, rm: RewardModel, rm_tokenizer,
                   prompts: Sequence[Sequence[dict]], *, max_tokens: int = 256,
                   batch_size: int = 16) -> list[float]:
    """The reward of the policy's greedy answer to each prompt (prompts decoded in batches)."""
    was_training = policy.training
    policy.eval()
    config = GenerationConfig(max_tokens=max_tokens, temp=0.0)
    texts = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[i : i + batch_size]]
            outs = batch_generate(policy, tokenizer, [tokenizer.encode_chat(p) for p in chunk], config)
            texts += [_cut_at_tags(tokenizer.decode(o))[0] for o in outs]
    finally:
        policy.train(was_training)
    seqs = [encode_response(rm_tokenizer, list(p), t, rm.max_len)
            for p, t in zip(prompts, texts)]
    return score_sequences(rm, seqs, batch_size=batch_size)


# --------------------------------------------------------------------------- the loop


def finetune(policy, tokenizer, train_file, adapter_path, opts, *,
             lora_config=None, log: Callable[[str], None] = log_stderr):
    """Fine-tune ``policy``'s LoRA adapters on a ``lora-train`` JSONL file with
    ``sft.lora_train`` (``opts``: an ``sft.SFTOptions``; its data files, adapter path and
    resume are replaced); adapters the policy already has (``lora_config`` describes them)
    are trained further, else new ones are added. The adapters are written to
    ``adapter_path``. Returns the trainer's result."""
    from llama2_mlx.training.sft import lora_train

    opts = dataclasses.replace(opts, data=None, train=str(train_file), valid=None, test=None,
                               adapter_path=str(adapter_path), resume=False)
    return lora_train(opts, policy, tokenizer, log, lora_config=lora_config,
                      description="rs fine-tune").train


@dataclass
class RSLoopConfig:
    """``iterations`` of rejection sampling (``rs``) then fine-tuning (``sft``: an
    ``sft.SFTOptions``; its data and adapter path are set per iteration). The mean greedy
    reward is measured on ``eval_prompts`` (default: the sampling prompts) with answers of
    up to ``greedy_max_tokens`` (default: the sampling max-tokens)."""

    iterations: int = 1
    rs: RSConfig = field(default_factory=RSConfig)
    sft: Optional["SFTOptions"] = None
    greedy_max_tokens: Optional[int] = None

    def __post_init__(self):
        from llama2_mlx.training.sft import SFTOptions

        if self.sft is None:
            self.sft = SFTOptions(lr=1e-4, epochs=1, progress=True)
        if self.iterations < 1:
            raise Llama2Error(f"--iterations must be at least 1 (got {self.iterations})")


@dataclass
class IterationSummary:
    """One line of ``summary.jsonl``: the winners' mean best and median reward (sampled
    from the previous iteration's policy) and the new policy's mean greedy reward."""

    iteration: int
    mean_greedy_reward: float
    mean_best_reward: Optional[float] = None
    mean_median_reward: Optional[float] = None
    pool_size: int = 0
    adapter_path: Optional[str] = None
    seconds: float = 0.0

    def line(self) -> str:
        if self.iteration == 0:
            return f"iteration 0 (start): mean greedy reward {self.mean_greedy_reward:.4f}"
        return (f"iteration {self.iteration}: mean best reward {self.mean_best_reward:.4f}, "
                f"median {self.mean_median_reward:.4f}, mean greedy reward "
                f"{self.mean_greedy_reward:.4f} (pool {self.pool_size}, {self.seconds:.1f}s)")


SETTINGS_FILE = "rs_loop.json"
SUMMARY_FILE = "summary.jsonl"
# SFTOptions fields that rs-loop sets itself or that do not change the results.
_NOT_SETTINGS = ("data", "train", "valid", "test", "adapter_path", "resume", "progress")


def _settings(config: RSLoopConfig, prompts, eval_prompts) -> dict:
    """What a resumed run must share with the run it continues (all but the iteration count)."""
    import hashlib

    def digest(x) -> str:
        return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]

    sft = {k: v for k, v in dataclasses.asdict(config.sft).items() if k not in _NOT_SETTINGS}
    return json.loads(json.dumps({
        "k": config.rs.k, "generation": dataclasses.asdict(config.rs.generation),
        "score_batch_size": config.rs.score_batch_size, "sft": sft,
        "greedy_max_tokens": config.greedy_max_tokens,
        "prompts": digest(prompts), "eval_prompts": digest(eval_prompts)}))


def _differences(old, new, where=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)
    elif old != new:
        yield f"{where} was {json.dumps(old)}, now {json.dumps(new)}"


def _resumed(out: Path, settings: dict) -> tuple[list[IterationSummary], list[dict]]:
    """The finished iterations of the run in ``out`` and its pool of winners."""
    f = out / SETTINGS_FILE
    if not f.exists() or not (out / SUMMARY_FILE).exists():
        raise Llama2Error(f"--resume: {out} holds no rs-loop run to continue (no {f.name})")
    diff = list(_differences(read_json(f), settings))
    if diff:
        raise Llama2Error(f"--resume: {f} was written with other settings ({diff[0]}); "
                          "use the same options, or a new --out")
    summaries = [IterationSummary(**rec) for _, rec in read_jsonl(out / SUMMARY_FILE)]
    if [s.iteration for s in summaries] != list(range(len(summaries))):
        raise Llama2Error(f"--resume: {out / SUMMARY_FILE} is not a run of iterations 0, 1, ...")
    pool: list[dict] = []
    last = len(summaries) - 1
    if last >= 1:
        d = out / f"iter_{last:02d}"
        if not (d / "adapters" / "adapter_config.json").exists():
            raise Llama2Error(f"--resume: {d / 'adapters'} is missing (iteration {last})")
        pool = [rec for _, rec in read_jsonl(d / "train.jsonl")]
    return summaries, pool


def rs_loop(
    load_policy: Callable[..., tuple], rm: RewardModel, rm_tokenizer,
    prompts: Sequence[Sequence[dict]], out_dir, config: Optional[RSLoopConfig] = None, *,
    eval_prompts: Optional[Sequence[Sequence[dict]]] = None, lora_config=None,
    resume: bool = False, log: Callable[[str], None] = log_stderr,
) -> list[IterationSummary]:
    """Run ``config.iterations`` rounds of sample -> score -> fine-tune.

    ``load_policy()`` returns a fresh ``(model, tokenizer)`` of the starting policy
    (``lora_config`` describes its adapters, if it has some); ``load_policy(path)`` the
    same base with the adapters in ``path`` instead. Iteration i samples with the
    policy of iteration i-1, adds its winners to the pool, fine-tunes a fresh
    starting policy on the whole pool and measures its mean greedy reward. Under
    ``out_dir/iter_NN/`` it writes ``samples.jsonl`` (all K), ``winners.jsonl``,
    ``train.jsonl`` (the pool) and ``adapters/``; ``summary.jsonl`` gets one line per
    iteration, iteration 0 being the starting policy. ``resume`` continues the run in
    ``out_dir`` after its last finished iteration (same settings; ``iterations`` may
    grow), with the same results as a run that was never stopped.
    """
    config = config or RSLoopConfig()
    config.rs.check()
    out = Path(out_dir)
    eval_prompts = list(eval_prompts) if eval_prompts is not None else list(prompts)
    settings = _settings(config, list(prompts), eval_prompts)
    if resume:
        summaries, pool = _resumed(out, settings)
    elif (out / SUMMARY_FILE).exists():
        raise Llama2Error(f"{out}: holds an earlier rs-loop run ({SUMMARY_FILE}); pass --resume "
                          "to continue it, or choose another --out")
    else:
        summaries, pool = [], []
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / SETTINGS_FILE, settings)
    greedy_tokens = config.greedy_max_tokens or config.rs.generation.max_tokens

    def record(s: IterationSummary) -> None:
        summaries.append(s)
        write_jsonl_atomic(out / SUMMARY_FILE, (dataclasses.asdict(x) for x in summaries))
        log(s.line())

    def greedy(p) -> float:
        r = greedy_rewards(p, tokenizer, rm, rm_tokenizer, eval_prompts, max_tokens=greedy_tokens)
        return float(sum(r) / len(r))

    done = len(summaries) - 1
    if done < 1:
        policy, tokenizer = load_policy()
    else:
        policy, tokenizer = load_policy(out / f"iter_{done:02d}" / "adapters")
        log(f"resuming {out} after iteration {done} (pool {len(pool)})")
    if done < 0:
        record(IterationSummary(0, greedy(policy)))
    base_seed = config.rs.generation.seed if config.rs.generation.seed is not None else 0
    for it in range(max(done, 0) + 1, config.iterations + 1):
        tic = time.perf_counter()
        d = out / f"iter_{it:02d}"
        rs = dataclasses.replace(config.rs, generation=dataclasses.replace(
            config.rs.generation, seed=base_seed + it))
        report = rejection_sample(policy, tokenizer, rm, rm_tokenizer, prompts, rs,
                                  progress=config.sft.progress)
        log(f"iteration {it}: {report.summary()}")
        write_report(report, d / "winners.jsonl", d / "samples.jsonl")
        pool += [r.winner_record() for r in report.results]
        write_jsonl_atomic(d / "train.jsonl", pool)
        del policy
        policy, tokenizer = load_policy()
        sft = dataclasses.replace(config.sft, seed=config.sft.seed + it)
        finetune(policy, tokenizer, d / "train.jsonl", d / "adapters", sft,
                 lora_config=lora_config, log=log)
        record(IterationSummary(it, greedy(policy), report.mean_best, report.mean_median,
                                len(pool), str(d / "adapters"), time.perf_counter() - tic))
    return summaries


# --------------------------------------------------------------------------- from files


def _load_pair(model, adapter_path, reward_model, dtype, log):
    """The starting policy's ``SharedBase``, its LoRA config (if ``adapter_path``) and the
    reward model, on the policy's base weights when it was trained on the same base."""
    from llama2_mlx.checkpoints.shared import SharedBase
    from llama2_mlx.models.lora import read_adapter_config
    from llama2_mlx.rlhf.reward_model import load_reward_model

    lora_config = None
    if adapter_path is not None:
        kind, lora_config = read_adapter_config(adapter_path)
        if kind != "lora":
            raise Llama2Error(f"--adapter-path {adapter_path}: holds a {kind} fine-tune, "
                              "not LoRA adapters (fuse it into the model first)")
    base = SharedBase.load(model, dtype)
    rm, rm_tokenizer = load_reward_model(reward_model, dtype=dtype, shared=base)
    if base.shared_by(rm):
        log("the reward model shares the policy's base weights (one copy in memory)")
    return base, lora_config, rm, rm_tokenizer


def rejection_sample_files(model, reward_model, prompts_file, out, config: Optional[RSConfig] = None,
                           *, adapter_path=None, all_out=None, dtype=None,
                           progress: bool = True, log: Callable[[str], None] = log_stderr) -> RSReport:
    """Load the policy (``model`` [+ ``adapter_path``]) and the reward model folder, run
    ``rejection_sample`` on the prompts of ``prompts_file`` and ``write_report``."""
    config = config or RSConfig()
    config.check()
    prompts = read_prompts(prompts_file)
    base, _, rm, rm_tokenizer = _load_pair(model, adapter_path, reward_model, dtype, log)
    policy, tokenizer = base.policy(adapter_path)
    report = rejection_sample(policy, tokenizer, rm, rm_tokenizer, prompts, config,
                              progress=progress)
    write_report(report, out, all_out)
    return report


def rs_loop_files(model, reward_model, prompts_file, out_dir, config: Optional[RSLoopConfig] = None,
                  *, adapter_path=None, eval_prompts_file=None, dtype=None, resume: bool = False,
                  log: Callable[[str], None] = log_stderr) -> list[IterationSummary]:
    """``rs_loop`` with the starting policy ``model`` [+ ``adapter_path``], a reward model
    folder and prompt files."""
    config = config or RSLoopConfig()
    config.rs.check()
    prompts = read_prompts(prompts_file)
    eval_prompts = read_prompts(eval_prompts_file) if eval_prompts_file is not None else None
    base, lora_config, rm, rm_tokenizer = _load_pair(model, adapter_path, reward_model, dtype, log)

    def load_policy(adapters=None):
        return base.policy(adapters if adapters is not None else adapter_path)

    return rs_loop(load_policy, rm, rm_tokenizer, prompts, out_dir, config,
                   eval_prompts=eval_prompts, lora_config=lora_config, resume=resume, log=log)
