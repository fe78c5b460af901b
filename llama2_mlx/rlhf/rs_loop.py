"""The rejection-sampling loop (Touvron et al. 2023, §3.2.3): sample -> score -> fine-tune.

``rs_loop`` repeats ``rejection.rejection_sample`` and a LoRA fine-tune; each iteration
fine-tunes the starting policy on the winners of *all* iterations so far (the paper
found that training on the last iteration's winners alone regressed). A run's folder
records its settings and one summary line per iteration, so it can be resumed.

Under ``mlx.launch`` the sampling, the greedy evaluation and the fine-tunes are shared
out across the ranks (with the results of one process); rank 0 alone writes the run's
folder, and reads it on ``--resume`` for the others (whose fine-tunes read the pool
from a private copy). Resuming needs the adapters of the last iteration readable on
every rank (a shared folder).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from llama2_mlx.chat.records import read_flagged_prompts
from llama2_mlx.errors import Llama2Error, OptionError
from llama2_mlx.io.atomic import write_json_atomic, write_jsonl_atomic
from llama2_mlx.io.distributed import World, world
from llama2_mlx.io.outdir import Claim, claim_output
from llama2_mlx.io.progress import log_stderr
from llama2_mlx.io.readers import read_json, read_jsonl
from llama2_mlx.rlhf.gate import RewardScorer
from llama2_mlx.rlhf.rejection import (
    RSConfig,
    greedy_rewards,
    load_models,
    rejection_sample,
    safety_flags,
    write_report,
)
from llama2_mlx.rlhf.reward_model import RewardModel
from llama2_mlx.training.checkpoint import json_digest
from llama2_mlx.training.metrics import METRICS_FILE, MetricsLog

if TYPE_CHECKING:
    from llama2_mlx.training.sft import SFTOptions


def finetune(policy, tokenizer, train_file, adapter_path, opts, *,
             lora_config=None, log: Callable[[str], None] = log_stderr, metrics=None):
    """Fine-tune ``policy``'s LoRA adapters on a ``lora-train`` JSONL file with
    ``sft.lora_train`` (``opts``: an ``sft.SFTOptions``; its data files, adapter path and
    resume are replaced); adapters the policy already has (``lora_config`` describes them)
    are trained further, else new ones are added. The adapters are written to
    ``adapter_path``, the metrics to ``metrics`` (a ``MetricsLog``; default: the adapter
    folder's metrics.jsonl). Returns the trainer's result."""
    from llama2_mlx.training.sft import lora_train

    opts = opts.with_options(data=None, train=str(train_file), valid=None, test=None,
                             adapter_path=str(adapter_path), resume=False,
                             overwrite=True)  # the loop's own folder: a restarted iteration
    return lora_train(opts, policy, tokenizer, log, lora_config=lora_config,
                      description="rs fine-tune", metrics=metrics).train


# rs-loop's fine-tunes: lora-train's defaults but for a higher peak learning rate.
FINETUNE_DEFAULTS = {"lr": 1e-4}


@dataclass
class RSLoopConfig:
    """``iterations`` of rejection sampling (``rs``) then fine-tuning (``sft``: an
    ``sft.SFTOptions``, by default lora-train's with ``FINETUNE_DEFAULTS``; its data and
    adapter path are set per iteration). The mean greedy reward is measured on
    ``eval_prompts`` (default: the sampling prompts) with answers of up to
    ``greedy_max_tokens`` (default: the sampling max-tokens)."""

    iterations: int = 1
    rs: RSConfig = field(default_factory=RSConfig)
    sft: Optional["SFTOptions"] = None
    greedy_max_tokens: Optional[int] = None

    def __post_init__(self):
        from llama2_mlx.training.sft import SFTOptions

        if self.sft is None:
            self.sft = SFTOptions.resolve(defaults=FINETUNE_DEFAULTS)
        if self.iterations < 1:
            raise OptionError("{iterations} must be at least 1 (got {got})", got=self.iterations)


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
_NOT_SETTINGS = ("data", "train", "valid", "test", "adapter_path", "resume", "overwrite",
                 "progress", "log_every")


def _settings(config: RSLoopConfig, prompts, eval_prompts, flags, eval_flags) -> dict:
    """What a resumed run must share with the run it continues (all but the iteration count)."""
    sft = {k: v for k, v in config.sft.settings().items() if k not in _NOT_SETTINGS}
    return json.loads(json.dumps({
        "k": config.rs.k, "generation": dataclasses.asdict(config.rs.generation),
        "score_batch_size": config.rs.score_batch_size, "sft": sft,
        "greedy_max_tokens": config.greedy_max_tokens,
        # The safety flags count only when a prompt has one (older runs stay resumable).
        "prompts": json_digest([prompts, flags] if any(flags) else prompts),
        "eval_prompts": json_digest([eval_prompts, eval_flags] if any(eval_flags)
                                    else eval_prompts)}))


def _differences(old, new, where=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)
    elif old != new:
        yield f"{where} was {json.dumps(old)}, now {json.dumps(new)}"


def _summary(rec, where: Path, line: int) -> IterationSummary:
    """A ``summary.jsonl`` record, its keys and their types checked (one line if wrong)."""
    fields = {f.name: f for f in dataclasses.fields(IterationSummary)}
    bad = (None if isinstance(rec, dict) else "is not an object") or next(
        (f"has an unknown key {k!r}" for k in rec if k not in fields), None) or next(
        (f"has no {k!r}" for k in ("iteration", "mean_greedy_reward") if k not in rec), None)
    if bad is None:
        kinds = {"iteration": (int,), "pool_size": (int,), "adapter_path": (str, type(None)),
                 "mean_best_reward": (int, float, type(None)),
                 "mean_median_reward": (int, float, type(None))}
        bad = next((f"{k} = {json.dumps(v)[:40]} has the wrong type" for k, v in rec.items()
                    if isinstance(v, bool) or not isinstance(v, kinds.get(k, (int, float)))),
                   None)
    if bad is not None:
        raise Llama2Error(f"{where} line {line}: the record {bad}")
    return IterationSummary(**rec)


def _resumed(out: Path, settings: dict) -> tuple[list[IterationSummary], list[dict]]:
    """The finished iterations of the run in ``out`` and its pool of winners."""
    f = out / SETTINGS_FILE
    if not f.exists() or not (out / SUMMARY_FILE).exists():
        raise OptionError("{resume}: {out} holds no rs-loop run to continue (no {name})",
                          out=out, name=f.name)
    diff = list(_differences(read_json(f), settings))
    if diff:
        raise OptionError("{resume}: {f} was written with other settings ({diff}); "
                          "use the same options, or a new {out}", f=f, diff=diff[0])
    summaries = [_summary(rec, out / SUMMARY_FILE, line)
                 for line, rec in read_jsonl(out / SUMMARY_FILE)]
    if [s.iteration for s in summaries] != list(range(len(summaries))):
        raise OptionError("{resume}: {out_SUMMARY_FILE} is not a run of iterations 0, 1, ...",
                          out_SUMMARY_FILE=out / SUMMARY_FILE)
    pool: list[dict] = []
    last = len(summaries) - 1
    if last >= 1:
        d = out / f"iter_{last:02d}"
        if not (d / "adapters" / "adapter_config.json").exists():
            raise OptionError("{resume}: {d_adapters} is missing (iteration {last})",
                              d_adapters=d / 'adapters', last=last)
        pool = [rec for _, rec in read_jsonl(d / "train.jsonl")]
    return summaries, pool


def _from_main(w: World, read: Callable[[], tuple[list, list]]):
    """``read()`` on rank 0 (the run folder is rank 0's), its result or error on every rank."""
    if w.size == 1:
        return read()
    msg = None
    if w.is_main:
        try:
            summaries, pool = read()
            msg = {"summaries": [dataclasses.asdict(x) for x in summaries], "pool": pool}
        except Llama2Error as e:
            msg = {"error": str(e)}
    msg = w.broadcast_object(msg, "reading the rs-loop folder")
    if "error" in msg:
        raise Llama2Error(msg["error"])
    return [IterationSummary(**x) for x in msg["summaries"]], msg["pool"]


def _fresh(out: Path, settings: dict) -> tuple[list, list]:
    if (out / SUMMARY_FILE).exists():
        raise OptionError("{path}: holds an earlier rs-loop run ({file}); pass {resume} "
                          "to continue it, or choose another {out}", path=out, file=SUMMARY_FILE)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / SETTINGS_FILE, settings)
    return [], []


def rs_loop(
    load_policy: Callable[..., tuple], rm: RewardModel | RewardScorer, rm_tokenizer,
    prompts: Sequence[Sequence[dict]], out_dir, config: Optional[RSLoopConfig] = None, *,
    eval_prompts: Optional[Sequence[Sequence[dict]]] = None, lora_config=None,
    resume: bool = False, overwrite: bool = False, log: Callable[[str], None] = log_stderr,
    safety_prompts: Optional[Sequence[bool]] = None,
    eval_safety_prompts: Optional[Sequence[bool]] = None, claim: Optional[Claim] = None,
) -> list[IterationSummary]:
    """Run ``config.iterations`` rounds of sample -> score -> fine-tune.

    ``load_policy()`` returns a fresh ``(model, tokenizer)`` of the starting policy
    (``lora_config`` describes its adapters, if it has some); ``load_policy(path)`` the
    same base with the adapters in ``path`` instead. Iteration i samples with the
    policy of iteration i-1, adds its winners to the pool, fine-tunes a fresh
    starting policy on the whole pool and measures its mean greedy reward. Under
    ``out_dir/iter_NN/`` it writes ``samples.jsonl`` (all K), ``winners.jsonl``,
    ``train.jsonl`` (the pool) and ``adapters/``; ``summary.jsonl`` gets one line per
    iteration, iteration 0 being the starting policy, and ``metrics.jsonl`` the
    fine-tunes' metrics (with their ``iteration``) and an "iteration" record each. ``resume`` continues the run in
    ``out_dir`` after its last finished iteration (same settings; ``iterations`` may
    grow), with the same results as a run that was never stopped; ``overwrite`` replaces an
    earlier run there (kept until this run's first fine-tuned iteration). ``rm`` may be a
    ``gate.RewardScorer`` of two reward models; ``safety_prompts`` (and
    ``eval_safety_prompts``) flag the safety prompts of the gate (default: none).
    ``claim``: the folder already claimed by the caller (``claim_rs_folder``).
    """
    if claim is None:
        with claim_rs_folder(out_dir, resume, overwrite, log) as claim:
            return rs_loop(load_policy, rm, rm_tokenizer, prompts, out_dir, config,
                           eval_prompts=eval_prompts, lora_config=lora_config, resume=resume,
                           log=log, safety_prompts=safety_prompts,
                           eval_safety_prompts=eval_safety_prompts, claim=claim)
    config = config or RSLoopConfig()
    config.rs.check()
    out = Path(out_dir)
    flags = safety_flags(prompts, safety_prompts)
    if eval_prompts is None:
        eval_prompts, eval_flags = list(prompts), flags
    else:
        eval_prompts = list(eval_prompts)
        eval_flags = safety_flags(eval_prompts, eval_safety_prompts)
    settings = _settings(config, list(prompts), eval_prompts, flags, eval_flags)
    w = world()
    log = w.main_only(log)
    summaries, pool = _from_main(w, lambda: _resumed(out, settings) if resume
                                 else _fresh(out, settings))
    greedy_tokens = config.greedy_max_tokens or config.rs.generation.max_tokens
    metrics = None
    if w.is_main:  # rank 0 alone writes
        metrics = MetricsLog(out / METRICS_FILE)
        metrics.restart(len(summaries) - 1 if resume else -1, key="iteration")
    # The pool the fine-tunes read: the run's train.jsonl on rank 0, a private copy elsewhere.
    private = None if w.is_main else Path(tempfile.mkdtemp(prefix="llama2-rs-pool-"))
    try:
        return _iterations(load_policy, rm, rm_tokenizer, (prompts, flags), out, config,
                           (eval_prompts, eval_flags), lora_config, log, summaries, pool,
                           greedy_tokens, w, private, metrics, claim)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _iterations(load_policy, rm, rm_tokenizer, prompts, out: Path, config: RSLoopConfig,
                eval_prompts, lora_config, log, summaries: list, pool: list, greedy_tokens: int,
                w: World, private: Optional[Path], metrics, claim: Claim
                ) -> list[IterationSummary]:
    """The iterations of ``rs_loop`` after the finished ones (``summaries``); ``prompts``
    and ``eval_prompts`` are (prompts, safety flags)."""
    prompts, flags = prompts
    eval_prompts, eval_flags = eval_prompts

    def record(s: IterationSummary) -> None:
        summaries.append(s)
        if w.is_main:
            write_jsonl_atomic(out / SUMMARY_FILE, (dataclasses.asdict(x) for x in summaries))
            metrics.write("iteration", s.iteration, iteration=s.iteration,
                          mean_greedy_reward=s.mean_greedy_reward,
                          mean_best_reward=s.mean_best_reward,
                          mean_median_reward=s.mean_median_reward, pool_size=s.pool_size)
        log(s.line())
        if s.iteration >= 1:
            claim.commit()  # a fine-tuned iteration of its own: an earlier run set aside goes

    def greedy(p) -> float:
        r = greedy_rewards(p, tokenizer, rm, rm_tokenizer, eval_prompts, max_tokens=greedy_tokens,
                           safety_prompts=eval_flags)
        return float(sum(r) / len(r))

    done = len(summaries) - 1
    if done < 1:
        policy, tokenizer = load_policy()
    else:
        policy, tokenizer = load_policy(out / f"iter_{done:02d}" / "adapters")
        log(f"resuming {out.resolve()} after iteration {done} (pool {len(pool)})")
    if done < 0:
        record(IterationSummary(0, greedy(policy)))
    base_seed = config.rs.generation.seed if config.rs.generation.seed is not None else 0
    for it in range(max(done, 0) + 1, config.iterations + 1):
        tic = time.perf_counter()
        d = out / f"iter_{it:02d}"
        rs = dataclasses.replace(config.rs, generation=dataclasses.replace(
            config.rs.generation, seed=base_seed + it))
        report = rejection_sample(policy, tokenizer, rm, rm_tokenizer, prompts, rs,
                                  progress=config.sft.train.progress, safety_prompts=flags)
        log(f"iteration {it}: {report.summary()}")
        write_report(report, d / "winners.jsonl", d / "samples.jsonl")
        pool += [r.winner_record() for r in report.results]
        train_file = d / "train.jsonl" if w.is_main else private / f"iter_{it:02d}.jsonl"
        write_jsonl_atomic(train_file, pool)
        del policy
        policy, tokenizer = load_policy()
        sft = config.sft.with_options(seed=config.sft.train.seed + it)
        finetune(policy, tokenizer, train_file, d / "adapters", sft, lora_config=lora_config,
                 log=log, metrics=metrics.scoped(iteration=it) if metrics is not None else None)
        record(IterationSummary(it, greedy(policy), report.mean_best, report.mean_median,
                                len(pool), str(d / "adapters"), time.perf_counter() - tic))
    return summaries


# --------------------------------------------------------------------------- from files


def rs_loop_files(model, reward_model, prompts_file, out_dir, config: Optional[RSLoopConfig] = None,
                  *, adapter_path=None, eval_prompts_file=None, dtype=None, resume: bool = False,
                  overwrite: bool = False, log: Callable[[str], None] = log_stderr,
                  safety_reward_model=None) -> list[IterationSummary]:
    """``rs_loop`` with the starting policy ``model`` [+ ``adapter_path``], a reward model
    folder (and a safety one: the gated reward) and prompt files (with their ``"safety"``
    flags)."""
    config = config or RSLoopConfig()
    config.rs.check()
    with claim_rs_folder(out_dir, resume, overwrite, log) as claim:
        return _rs_loop_files(model, reward_model, prompts_file, out_dir, config, adapter_path,
                              eval_prompts_file, dtype, resume, log, claim,
                              safety_reward_model)


# What an rs-loop run leaves in its folder, and those of them that are results to keep.
RS_ARTEFACTS = (SUMMARY_FILE, SETTINGS_FILE, METRICS_FILE, "iter_*")
RS_RESULTS = (SUMMARY_FILE, "iter_*")


def claim_rs_folder(out_dir, resume: bool, overwrite: bool, log):
    """``claim_output`` of an rs-loop run's folder (``--out``)."""
    return claim_output(out_dir, field="out", artefacts=RS_ARTEFACTS, results=RS_RESULTS,
                        resume=resume, overwrite=overwrite, continues="{resume}",
                        say=world().main_only(log), world=world())


def _rs_loop_files(model, reward_model, prompts_file, out_dir, config, adapter_path,
                   eval_prompts_file, dtype, resume, log, claim, safety_reward_model
                   ) -> list[IterationSummary]:
    prompts, flags = read_flagged_prompts(prompts_file)
    eval_prompts = eval_flags = None
    if eval_prompts_file is not None:
        eval_prompts, eval_flags = read_flagged_prompts(eval_prompts_file)
    base, lora_config, rm, rm_tokenizer = load_models(model, adapter_path, reward_model, dtype, log,
                                                      safety_reward_model)

    def load_policy(adapters=None):
        return base.policy(adapters if adapters is not None else adapter_path)

    return rs_loop(load_policy, rm, rm_tokenizer, prompts, out_dir, config,
                   eval_prompts=eval_prompts, lora_config=lora_config, resume=resume, log=log,
                   safety_prompts=flags, eval_safety_prompts=eval_flags, claim=claim)
