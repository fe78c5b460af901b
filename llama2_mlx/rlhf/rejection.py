"""Rejection sampling (Touvron et al. 2023, §3.2.3).

For every prompt, K answers are drawn from the policy (the prompt prefilled
once, its KV cache shared by the K samples, which decode as one batch), each
is scored by the reward model on the chat encoding of prompt + answer (with a
safety reward model too: the gated reward of §3.2.6, ``gate``), and the
best one becomes the prompt's new gold answer, written as JSONL that
``lora-train`` reads directly (``{"messages": [..., {"role": "assistant", ...}]}``).
The loop that repeats sample -> score -> fine-tune is ``rs_loop``.

The sampler is seeded per prompt (``prompt_seed``), so under ``mlx.launch`` the prompts
are shared out across the ranks (prompt ``i`` to rank ``i % size``) and the gathered
results are exactly those of one process with the same seed.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import mlx.core as mx

from llama2_mlx.chat.records import cut_answer, read_flagged_prompts
from llama2_mlx.errors import Llama2Error, OptionError, check_fields
from llama2_mlx.generation.generate import GenerationConfig, batch_generate, sample_k
from llama2_mlx.io.atomic import write_jsonl_atomic
from llama2_mlx.io.distributed import World, world
from llama2_mlx.io.outdir import check_output_file
from llama2_mlx.io.progress import ProgressBar, log_stderr
from llama2_mlx.models.model import eval_mode
from llama2_mlx.rlhf.gate import RewardScorer, as_scorer
from llama2_mlx.rlhf.reward_model import RewardModel


@dataclass
class RSConfig:
    """K samples per prompt drawn with ``generation`` (temperature, top-p, max tokens...;
    its seed seeds the whole run); ``score_batch_size`` sequences per reward batch.
    ``k`` and the sampling fields of ``generation`` (as set here: temperature 1, seed 0)
    are the sampling options of ``rejection-sample`` and ``rs-loop``."""

    k: int = field(default=4, metadata={"help": "Samples per prompt.", "min": 1})
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_tokens=256, temp=1.0, top_p=1.0, seed=0))
    score_batch_size: int = field(default=16, metadata={"min": 1})

    def check(self) -> None:
        check_fields(self)  # the ranges in the fields' metadata
        self.generation.check()


@dataclass
class PromptSamples:
    """The K answers to one prompt, their rewards, whether each ended with EOS (rather
    than at max_tokens), and the index of the best one; whether the prompt is a safety
    prompt and, with two reward models, each answer's helpfulness and safety scores."""

    prompt: list[dict]
    texts: list[str]
    rewards: list[float]
    finished: list[bool]
    best: int
    safety_prompt: bool = False
    components: list[dict] = field(default_factory=list)

    @property
    def best_reward(self) -> float:
        return self.rewards[self.best]

    @property
    def median_reward(self) -> float:
        return float(statistics.median(self.rewards))

    def winner_record(self) -> dict:
        """The best answer as a ``lora-train`` record (plus its reward)."""
        answer = {"role": "assistant", "content": self.texts[self.best]}
        record = {"messages": self.prompt + [answer], "reward": self.best_reward}
        if self.components:
            record.update(self.components[self.best])
        return {**record, "safety": True} if self.safety_prompt else record

    def all_record(self) -> dict:
        """The prompt, all K answers with their rewards, and the index of the best."""
        components = self.components or [{}] * len(self.texts)
        record = {
            "messages": self.prompt, "best": self.best,
            "samples": [{"text": t, "reward": r, "finished": f, **c}
                        for t, r, f, c in zip(self.texts, self.rewards, self.finished, components)],
        }
        return {**record, "safety": True} if self.safety_prompt else record


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


def _answer(tokenizer, ids) -> tuple[str, bool]:
    """A sampled answer's text, cut at the first chat tag, and whether it was cut there."""
    text, cut = cut_answer(tokenizer.decode(ids))
    return text.strip(), cut


def _pick_best(rewards: Sequence[float], finished: Sequence[bool]) -> int:
    # An answer cut off at max-tokens is a winner only if no answer finished.
    pool = [i for i, f in enumerate(finished) if f] or list(range(len(rewards)))
    return max(pool, key=lambda i: rewards[i])


def prompt_seed(seed: int, i: int) -> int:
    """The sampling seed of prompt ``i`` of a run seeded with ``seed``."""
    return (seed * 1_000_003 + i) % 2**32


def safety_flags(prompts: Sequence, safety_prompts: Optional[Sequence[bool]]) -> list[bool]:
    """One safety flag per prompt (default: none is a safety prompt)."""
    if safety_prompts is None:
        return [False] * len(prompts)
    if len(safety_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(safety_prompts)} safety flags")
    return [bool(f) for f in safety_prompts]


def rejection_sample(
    policy, tokenizer, rm: RewardModel | RewardScorer, rm_tokenizer,
    prompts: Sequence[Sequence[dict]], config: Optional[RSConfig] = None, *,
    progress: bool = True, safety_prompts: Optional[Sequence[bool]] = None,
) -> RSReport:
    """Sample ``config.k`` answers per prompt with ``sample_k`` (one prefill, K-row batched
    decoding), score each answer with ``rm`` (a reward model, on ``rm_tokenizer``'s chat
    encoding of prompt + answer, EOS included, the shared prompt run once there too, see
    ``score_shared_prefix``; or a ``gate.RewardScorer`` of two reward models, whose gated
    reward sees ``safety_prompts``, one flag per prompt) and pick the best (among the
    answers that ended with EOS, when any did). Prompt ``i`` is sampled with seed
    ``prompt_seed(seed, i)``; under ``mlx.launch`` every rank samples its share and every
    rank gets all the results."""
    config = config or RSConfig()
    config.check()
    if not prompts:
        raise Llama2Error("no prompts to sample")
    scorer = as_scorer(rm, rm_tokenizer)
    flags = safety_flags(prompts, safety_prompts)
    gen = dataclasses.replace(config.generation, seed=None)
    w = world()
    mine = range(w.rank, len(prompts), w.size)
    report = RSReport([])
    tic = time.perf_counter()
    with eval_mode(policy), ProgressBar("rejection-sample", len(mine),
                                        ("best {best}", "median {median}"),
                                        enabled=progress and w.is_main) as bar:
        for n, i in enumerate(mine, 1):
            prompt = list(prompts[i])
            if config.generation.seed is not None:
                mx.random.seed(prompt_seed(config.generation.seed, i))
            t0 = time.perf_counter()
            outs, eos = sample_k(policy, tokenizer.encode_chat(prompt), config.k, gen,
                                 tokenizer.eos_id, tokenizer.vocab_size)
            t1 = time.perf_counter()
            texts, cut = zip(*(_answer(tokenizer, o) for o in outs))
            finished = [e or c for e, c in zip(eos, cut)]
            scores = scorer.score_answers(prompt, texts, flags[i],
                                          batch_size=config.score_batch_size)
            rewards = scores.rewards
            report.sample_seconds += t1 - t0
            report.score_seconds += time.perf_counter() - t1
            report.generated_tokens += sum(len(o) for o in outs)
            report.results.append(PromptSamples(
                prompt, list(texts), rewards, finished, _pick_best(rewards, finished), flags[i],
                [scores.item(j) for j in range(len(texts))] if scorer.gated else []))
            bar.update(n, best=f"{report.mean_best:.3f}", median=f"{report.mean_median:.3f}")
    if w.size > 1:
        report = _gathered(w, report, len(prompts))
    report.seconds = time.perf_counter() - tic
    return report


def _gathered(w: World, mine: RSReport, n: int) -> RSReport:
    """Every rank's results in prompt order (rank r sampled prompts r, r + size, ...);
    sampling and scoring times are the slowest rank's, tokens the sum."""
    parts = w.all_gather_objects(
        {"results": [dataclasses.asdict(r) for r in mine.results],
         "times": [mine.sample_seconds, mine.score_seconds], "tokens": mine.generated_tokens},
        "gathering the samples")
    results: list = [None] * n
    for rank, part in enumerate(parts):
        for j, r in enumerate(part["results"]):
            results[rank + j * w.size] = PromptSamples(**r)
    return RSReport(results, sample_seconds=max(p["times"][0] for p in parts),
                    score_seconds=max(p["times"][1] for p in parts),
                    generated_tokens=sum(p["tokens"] for p in parts))


def write_report(report: RSReport, out, all_out=None) -> None:
    """Write the winners (``lora-train`` JSONL) to ``out`` and, with ``all_out``, every
    sample with its reward; both atomically (under ``mlx.launch``: rank 0 alone)."""
    if not world().is_main:
        return
    write_jsonl_atomic(out, (r.winner_record() for r in report.results))
    if all_out is not None:
        write_jsonl_atomic(all_out, (r.all_record() for r in report.results))


def greedy_rewards(policy, tokenizer, rm: RewardModel | RewardScorer, rm_tokenizer,
                   prompts: Sequence[Sequence[dict]], *, max_tokens: int = 256,
                   batch_size: int = 16, safety_prompts: Optional[Sequence[bool]] = None
                   ) -> list[float]:
    """The reward of the policy's greedy answer to each prompt (prompts decoded in batches
    of ``batch_size``; under ``mlx.launch`` batch ``b`` on rank ``b % size``, the answers
    then gathered and scored as on one process); ``rm`` and ``safety_prompts`` as in
    ``rejection_sample``."""
    config = GenerationConfig(max_tokens=max_tokens, temp=0.0)
    w = world()
    texts: list = []
    with eval_mode(policy):
        for i in range(w.rank * batch_size, len(prompts), w.size * batch_size):
            chunk = [list(p) for p in prompts[i : i + batch_size]]
            outs = batch_generate(policy, tokenizer, [tokenizer.encode_chat(p) for p in chunk], config)
            texts.append([_answer(tokenizer, o)[0] for o in outs])
    if w.size > 1:
        parts = w.all_gather_objects(texts, "gathering the greedy answers")
        texts = [parts[b % w.size][b // w.size] for b in range(-(-len(prompts) // batch_size))]
    answers = [t for batch in texts for t in batch]
    return as_scorer(rm, rm_tokenizer).score_responses(
        [list(p) for p in prompts], answers, safety_flags(prompts, safety_prompts),
        batch_size=batch_size).rewards


# --------------------------------------------------------------------------- from files


def load_models(model, adapter_path, reward_model, dtype, log: Callable[[str], None],
                safety_reward_model=None):
    """The starting policy's ``SharedBase``, its LoRA config (if ``adapter_path``), the
    reward model and its tokenizer, on the policy's base weights when it was trained on
    the same base. With ``safety_reward_model`` the third item is a ``gate.RewardScorer``
    of both models (both on the shared base)."""
    from llama2_mlx.checkpoints.shared import SharedBase
    from llama2_mlx.models.lora import read_adapter_config
    from llama2_mlx.rlhf.reward_model import load_reward_model

    lora_config = None
    if adapter_path is not None:
        kind, lora_config = read_adapter_config(adapter_path)
        if kind != "lora":
            raise OptionError("{adapter_path} {path}: holds a {kind} fine-tune, not LoRA "
                              "adapters (fuse it into the model first)", path=adapter_path,
                              kind=kind)
    base = SharedBase.load(model, dtype)
    if safety_reward_model is not None:
        from llama2_mlx.rlhf.gate import load_scorer

        scorer = load_scorer(reward_model, safety_reward_model, dtype=dtype, shared=base)
        shared = [m for m in scorer.models if base.shared_by(m)]
        if shared:
            log(f"{len(shared)} of the 2 reward models share the policy's base weights "
                f"(one copy in memory)")
        return base, lora_config, scorer, scorer.helpful_tokenizer
    rm, rm_tokenizer = load_reward_model(reward_model, dtype=dtype, shared=base)
    if base.shared_by(rm):
        log("the reward model shares the policy's base weights (one copy in memory)")
    return base, lora_config, rm, rm_tokenizer


def rejection_sample_files(model, reward_model, prompts_file, out, config: Optional[RSConfig] = None,
                           *, adapter_path=None, all_out=None, dtype=None,
                           progress: bool = True, log: Callable[[str], None] = log_stderr,
                           safety_reward_model=None) -> RSReport:
    """Load the policy (``model`` [+ ``adapter_path``]) and the reward model folder (and
    the safety one), run ``rejection_sample`` on the prompts of ``prompts_file`` (with
    their ``"safety"`` flags) and ``write_report``."""
    config = config or RSConfig()
    config.check()
    log = world().main_only(log)
    if world().is_main:  # the outputs can be written: checked before any sampling
        check_output_file(out, "out")
        if all_out is not None:
            check_output_file(all_out, "all_out")
    prompts, flags = read_flagged_prompts(prompts_file)
    base, _, rm, rm_tokenizer = load_models(model, adapter_path, reward_model, dtype, log,
                                            safety_reward_model)
    policy, tokenizer = base.policy(adapter_path)
    report = rejection_sample(policy, tokenizer, rm, rm_tokenizer, prompts, config,
                              progress=progress, safety_prompts=flags)
    write_report(report, out, all_out)
    return report
