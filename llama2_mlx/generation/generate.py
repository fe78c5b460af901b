"""Text generation: a ladder of small functions.

``make_sampler`` (sample.py) -> ``generate_step`` (token ids, prefill in chunks,
then pipelined decoding) -> ``stream_generate`` (text chunks, stop conditions,
statistics) -> ``generate`` (the whole text). ``batch_generate`` and
``sample_k`` decode several sequences as one batch. Chat (``ChatSession``,
``chat_loop``) is in chat.py.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional, Sequence

import mlx.core as mx

from llama2_mlx.chat.records import cut_answer
from llama2_mlx.errors import SEED_RANGE, Llama2Error, OptionError, check_fields
from llama2_mlx.generation.sample import (
    LogitsProcessor,
    Sampler,
    greedy,
    make_filter,
    make_logits_processors,
    make_sampler,
)
from llama2_mlx.generation.speculative import (
    Drafter,
    DraftStats,
    make_drafter,
    speculative_generate_step,
)
from llama2_mlx.models.cache import (
    BoundedKVCache,
    PromptCache,
    cache_nbytes,
    fork,
    make_cache,
    prefill,
)


@dataclass
class GenerationConfig:
    """Options of one generation (see ``sample.make_sampler`` for the sampling ones).

    The fields with a ``help`` are the sampling options of the commands (``generate``,
    ``chat``, ``rejection-sample``, ``rs-loop``): each default and help text is written
    here only.
    """

    max_tokens: int = field(default=256, metadata={"help": "Most tokens to generate per answer."})
    temp: float = field(default=0.0, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=1.0, metadata={
        "help": "Nucleus sampling mass, Meta's top-p (1: off)."})
    top_k: int = field(default=0, metadata={
        "help": "Sample among the k most likely tokens (0: off)."})
    min_p: float = field(default=0.0, metadata={
        "help": "Keep only tokens of at least this share of the top probability (0: off)."})
    repetition_penalty: Optional[float] = field(default=None, metadata={
        "help": "Repetition penalty, e.g. 1.1 (default: off)."})
    repetition_context_size: Optional[int] = 20
    seed: Optional[int] = field(default=None, metadata={
        "help": "Random seed for reproducible sampling.", **SEED_RANGE})
    stop: list[str] = field(default_factory=list, metadata={
        "help": "Stop at this string (repeatable)."})
    prefill_step: int = 512
    max_kv_size: Optional[int] = field(default=None, metadata={
        "help": "Bound the KV cache to N tokens (attention sinks and a sliding window)."})
    prompt_lookup: Optional[int] = field(default=None, metadata={
        "help": "Speculative decoding by prompt lookup: draft what followed the longest "
        "match (up to N tokens) of the last tokens in the prompt and answer so far.",
        "max": 64})  # the drafter keeps an n-gram index per size: bounded
    draft_model: Optional[str] = field(default=None, metadata={
        "help": "Speculative decoding with this smaller model of the same tokenizer "
        "(folder or Hugging Face repo id) as the drafter."})
    num_draft_tokens: int = field(default=6, metadata={
        "help": "Most tokens drafted per step in speculative decoding (fewer while "
        "drafts are rejected).", "max": 64})

    def make_sampler(self) -> Sampler:
        """The sampler for temp/top_p/top_k/min_p."""
        return make_sampler(self.temp, self.top_p, self.top_k, self.min_p)

    def make_filter(self):
        """The distribution the sampler draws from (``sample.make_filter``; None: greedy)."""
        return make_filter(self.temp, self.top_p, self.top_k, self.min_p)

    @property
    def speculative(self) -> bool:
        """Whether speculative decoding is asked for (prompt lookup or a draft model)."""
        return self.prompt_lookup is not None or self.draft_model is not None

    def make_logits_processors(self) -> list[LogitsProcessor]:
        """The logits processors (repetition penalty) for these options."""
        return make_logits_processors(self.repetition_penalty, self.repetition_context_size)

    def check(self) -> None:
        """Raise ``OptionError`` (a ``Llama2Error``) for an invalid option."""
        check_fields(self)
        if self.max_tokens < 1:
            raise OptionError("{max_tokens} must be >= 1, got {got}", got=self.max_tokens)
        if self.prefill_step < 1:
            raise OptionError("{prefill_step} must be >= 1, got {got}", got=self.prefill_step)
        if self.max_kv_size is not None and self.max_kv_size <= kv_sinks():
            raise OptionError("{max_kv_size} {got} must be larger than {keep} kept tokens",
                              got=self.max_kv_size, keep=kv_sinks())
        if self.prompt_lookup is not None and self.prompt_lookup < 1:
            raise OptionError("{prompt_lookup} must be >= 1, got {got}", got=self.prompt_lookup)
        if self.num_draft_tokens < 1:
            raise OptionError("{num_draft_tokens} must be >= 1, got {got}",
                              got=self.num_draft_tokens)
        if self.prompt_lookup is not None and self.draft_model is not None:
            raise OptionError("give {prompt_lookup} or {draft_model}, not both")
        self.make_sampler()
        self.make_logits_processors()


def kv_sinks() -> int:
    """The tokens a bounded KV cache (``max_kv_size``) always keeps: its attention sinks."""
    return inspect.signature(BoundedKVCache).parameters["keep"].default


@dataclass
class Response:
    """One step of ``stream_generate``: new text and running statistics.

    ``finish_reason`` is None until the last response ('stop': EOS or a stop
    string; 'length': max_tokens). Speeds are tokens per second: the prompt
    one includes sampling the first token and counts only the prefilled tokens
    (``prompt_tokens - cached_tokens``), the generation one counts the tokens
    after the first. ``peak_memory`` is in GB.
    """

    text: str
    token: int
    finish_reason: Optional[str]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    kv_cache_bytes: int
    logprobs: Optional[mx.array] = None
    cached_tokens: int = 0  # prompt tokens taken from a PromptCache (not prefilled)
    drafted_tokens: Optional[int] = None  # speculative decoding only: tokens drafted so far
    accepted_tokens: int = 0  # of those, accepted

    @property
    def acceptance_rate(self) -> Optional[float]:
        """Accepted per drafted token (None without speculative decoding)."""
        if self.drafted_tokens is None:
            return None
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


def _processors(config: GenerationConfig, n: Optional[int]) -> list[LogitsProcessor]:
    """The config's processors, plus a guard for embeddings with rows beyond the
    tokenizer's ``n`` pieces (padded vocabularies): those ids could not be decoded."""
    processors = config.make_logits_processors()

    def only_pieces(tokens: mx.array, logits: mx.array) -> mx.array:
        if logits.shape[-1] <= n:
            return logits
        pad = mx.full((*logits.shape[:-1], logits.shape[-1] - n), -mx.inf, logits.dtype)
        return mx.concatenate([logits[..., :n], pad], axis=-1)

    return processors + ([only_pieces] if n is not None else [])


def generate_step(
    model,
    prompt,
    *,
    cache: Optional[list] = None,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    max_kv_size: Optional[int] = None,
    prefill_step: int = 512,
    max_tokens: Optional[int] = None,
    history: Optional[mx.array] = None,
) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield (token, logprobs) for each new token after ``prompt``.

    ``prompt`` is (T,) ids (yields a scalar token and (V,) logprobs) or a
    (B, T) batch (yields (B,) tokens and (B, V) logprobs). The prompt is
    prefilled in chunks of ``prefill_step``; each next step is queued with
    ``mx.async_eval`` before the current token is yielded. ``cache`` (one per
    layer, updated in place) defaults to a new one, bounded by ``max_kv_size``.
    Runs until ``max_tokens`` tokens (None: until the caller stops). The logits
    processors see ``history`` (B, L) (default: the prompt) and the new tokens:
    with a cache that already holds tokens, the whole sequence rather than ``prompt``.
    """
    prompt = prompt if isinstance(prompt, mx.array) else mx.array(prompt)
    single = prompt.ndim == 1
    tokens = prompt[None] if single else prompt
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise Llama2Error("the prompt has no tokens")
    if cache is None:
        cache = make_cache(model, max_kv_size)
    sampler = sampler or greedy
    processors = list(logits_processors or [])
    history, B = (tokens if history is None else history), tokens.shape[0]

    def step(inp: mx.array) -> tuple[mx.array, mx.array]:
        logits = model(inp, cache=cache)[:, -1, :].astype(mx.float32)
        for process in processors:
            logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = sampler(logprobs)
        # Yield exactly the arrays being evaluated: a slice taken later would queue
        # behind the next step and stall the pipeline.
        return (y[0], logprobs[0]) if single else (y, logprobs)

    y, logprobs = step(prefill(model, tokens, cache, prefill_step))
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        n += 1
        if max_tokens is None or n < max_tokens:
            column = y.reshape(B, 1)
            if processors:
                history = mx.concatenate([history, column], axis=1)
            next_y, next_logprobs = step(column)
            mx.async_eval(next_y, next_logprobs)
        yield y, logprobs
        if n == max_tokens:
            return
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs


class StopStrings:
    """Cuts streamed text at the first of some stop strings.

    ``add`` returns the text that is safe to show: a tail that could still
    begin a stop string is held back until the next chunk or ``flush``.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.hit = False

    def add(self, text: str) -> str:
        """Append a chunk; return what can be shown now ("" once a stop string was hit)."""
        if self.hit:
            return ""
        if not self.stops:
            return text
        buf = self.buffer + text
        head, self.hit = cut_answer(buf, self.stops)
        if self.hit:
            self.buffer = ""
            return head
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.buffer = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """The held-back tail (at the end of generation)."""
        text, self.buffer = self.buffer, ""
        return "" if self.hit else text


def stream_generate(
    model, tokenizer, prompt_ids: Sequence[int], config: Optional[GenerationConfig] = None,
    prompt_cache: Optional[PromptCache] = None, drafter: Optional[Drafter] = None,
) -> Iterator[Response]:
    """Generate from ``prompt_ids``, yielding a ``Response`` per sampled token.

    Stops at EOS (not shown), at a stop string of ``config.stop`` (text cut
    before it) or after ``config.max_tokens`` tokens; the last response has
    the ``finish_reason`` and the final statistics. With ``prompt_cache`` the
    prompt's prefix already in that cache is not run again, and the cache keeps
    this generation for the next (not with ``max_kv_size``: a fresh cache is used).

    Speculative decoding (``speculative.py``) runs with a ``drafter`` given here, else
    with the one of ``config.prompt_lookup`` / ``config.draft_model`` (loaded now: keep a
    ``ModelDrafter`` to reuse it); greedy output is that of plain decoding, sampled
    output has its distribution. The responses then count the drafted and accepted tokens.
    """
    config = config or GenerationConfig()
    config.check()
    if not len(prompt_ids):
        raise Llama2Error("the prompt has no tokens")
    if config.seed is not None:
        mx.random.seed(config.seed)
    ids = list(prompt_ids)
    if prompt_cache is not None and config.max_kv_size is None:
        cache, cached = prompt_cache.cache, prompt_cache.reuse(ids)
    else:
        prompt_cache, cache, cached = None, make_cache(model, config.max_kv_size), 0
    detok, stops = tokenizer.detokenizer(), StopStrings(config.stop)
    drafter = drafter if drafter is not None else make_drafter(config)
    stats = DraftStats() if drafter is not None else None
    if drafter is not None:
        steps = speculative_generate_step(
            model, mx.array(ids[cached:]), drafter, cache=cache, dist=config.make_filter(),
            logits_processors=_processors(config, tokenizer.vocab_size),
            prefill_step=config.prefill_step, max_tokens=config.max_tokens, context=ids,
            num_draft_tokens=config.num_draft_tokens, stats=stats,
        )
    else:
        steps = generate_step(
            model, mx.array(ids[cached:]), cache=cache, sampler=config.make_sampler(),
            logits_processors=_processors(config, tokenizer.vocab_size),
            prefill_step=config.prefill_step, max_tokens=config.max_tokens,
            history=mx.array(ids)[None],  # the processors see the whole prompt, cached or not
        )
    P = len(ids)
    tic = time.perf_counter()
    prompt_tps, t_first, n = 0.0, tic, 0
    generated: list[int] = []

    def response(text, token, reason, logprobs):
        dt = time.perf_counter() - t_first
        return Response(
            text, token, reason, P, prompt_tps, n, (n - 1) / dt if n > 1 and dt > 0 else 0.0,
            mx.get_peak_memory() / 1e9, cache_nbytes(cache), logprobs, cached,
            stats.drafted if stats is not None else None, stats.accepted if stats is not None else 0,
        )

    def finish() -> str:
        text = stops.add(detok.flush())
        return text + stops.flush()

    try:
        for y, logprobs in steps:
            token = y.item()
            generated.append(token)
            n += 1
            if n == 1:
                t_first = time.perf_counter()
                prompt_tps = (P - cached) / (t_first - tic)
            if token == tokenizer.eos_id:
                reason, text = "stop", finish()
                break
            text = stops.add(detok.add(token))
            if n == config.max_tokens and not stops.hit:
                text += finish()
                reason = "stop" if stops.hit else "length"
                break
            if stops.hit:
                reason = "stop"
                break
            yield response(text, token, None, logprobs)
        yield response(text, token, reason, logprobs)
    finally:
        if prompt_cache is not None:
            # The cache holds the prompt and the sampled tokens fed back so far (the
            # pipelined step may have fed one more than was shown; accepted drafts past a
            # stop, more): it is trimmed to the tokens it is known to hold.
            prompt_cache.tokens = (ids + generated)[: min(c.offset for c in cache)]
            for c in cache:
                c.trim(c.offset - len(prompt_cache.tokens))


def generate(
    model, tokenizer, prompt_ids: Sequence[int], config: Optional[GenerationConfig] = None,
    drafter: Optional[Drafter] = None,
) -> str:
    """The whole generated text (see ``stream_generate``)."""
    steps = stream_generate(model, tokenizer, prompt_ids, config, drafter=drafter)
    return "".join(r.text for r in steps)


class Samples(NamedTuple):
    """Token ids of several sequences, each cut at (excluding) EOS, and whether each one
    ended with EOS (False: it stopped at max_tokens)."""

    tokens: list[list[int]]
    finished: list[bool]


def _collect(steps, batch: int, eos_id: int, max_tokens: int) -> Samples:
    """The sequences of a batched ``generate_step``."""
    out = Samples([[] for _ in range(batch)], [False] * batch)
    done = [False] * batch
    for y, _ in steps:
        for i, t in enumerate(y.tolist()):
            if done[i]:
                continue  # finished rows keep decoding harmlessly; their tokens are dropped
            if t == eos_id:
                done[i] = out.finished[i] = True
            else:
                out.tokens[i].append(t)
                done[i] = len(out.tokens[i]) >= max_tokens
        if all(done):
            break
    return out


def batch_generate(
    model, tokenizer, prompts: Sequence[Sequence[int]], config: Optional[GenerationConfig] = None
) -> list[list[int]]:
    """Generate for several prompts as one batch; return each one's new token ids.

    Prompts are left-padded to a common length (the padding is masked out);
    each sequence ends at EOS (excluded) or ``config.max_tokens``. Stop
    strings are not applied here.
    """
    config = config or GenerationConfig()
    config.check()
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise Llama2Error("a prompt has no tokens")
    if config.seed is not None:
        mx.random.seed(config.seed)
    L = max(len(p) for p in prompts)
    pads = [L - len(p) for p in prompts]
    # Padding with the row's first id keeps the repetition-penalty context exact.
    rows = [[p[0]] * pad + list(p) for p, pad in zip(prompts, pads)]
    cache = make_cache(model, config.max_kv_size, pads if any(pads) else None)
    steps = generate_step(
        model, mx.array(rows), cache=cache, sampler=config.make_sampler(),
        logits_processors=_processors(config, tokenizer.vocab_size), prefill_step=config.prefill_step,
        max_tokens=config.max_tokens,
    )
    return _collect(steps, len(rows), tokenizer.eos_id, config.max_tokens).tokens


def sample_k(
    model, prompt_ids: Sequence[int], k: int, config: GenerationConfig, eos_id: int,
    vocab_size: Optional[int] = None,
) -> Samples:
    """Draw ``k`` answers to one prompt: their token ids (cut at, excluding, EOS) and
    whether each ended with EOS; ids from ``vocab_size`` (the tokenizer's piece count)
    up are never drawn.

    The prompt is prefilled once with batch 1; the k samples then decode as
    one batch over that one copy of its KV cache (``cache.fork``).
    """
    config.check()
    if k < 1:
        raise Llama2Error(f"k must be >= 1, got {k}")
    if not len(prompt_ids):
        raise Llama2Error("the prompt has no tokens")
    if config.seed is not None:
        mx.random.seed(config.seed)
    prompt = mx.array(list(prompt_ids))[None]
    cache = make_cache(model, config.max_kv_size)
    last = prefill(model, prompt, cache, config.prefill_step)
    cache = fork(cache, k)  # the prompt's KV held once, shared by the k rows
    steps = generate_step(
        model, mx.repeat(last, k, axis=0), cache=cache, sampler=config.make_sampler(),
        logits_processors=_processors(config, vocab_size), max_tokens=config.max_tokens,
        history=mx.repeat(prompt, k, axis=0),
    )
    return _collect(steps, k, eos_id, config.max_tokens)


def prompt_ids(
    tokenizer, prompt: str, system: Optional[str] = None, chat: bool = False
) -> list[int]:
    """Prompt token ids: BOS + the raw text, or Meta's chat format when ``chat`` or
    ``system`` is given (the system prompt folded into the user turn)."""
    if not chat and system is None:
        return tokenizer.encode(prompt, bos=True)
    messages = [{"role": "system", "content": system}] if system else []
    return tokenizer.encode_chat(messages + [{"role": "user", "content": prompt}])
