"""Speculative decoding: draft a few tokens cheaply, verify them in one forward pass.

Decoding reads every weight once per token; running the k drafted tokens (after the
last sampled one) through the model in one call costs little more than one step, and
yields the model's own next-token distribution at each of the k + 1 positions.

* Greedy: the drafts are kept while they equal the model's argmax; the first argmax
  that differs (or the one after the last draft) is the extra token of the step. The
  output is the one of plain decoding.
* Sampling: draft x (drawn from q) is accepted with probability min(1, p(x) / q(x)),
  where p is the model's distribution after the logits processors and the sampler's
  transforms (``sample.make_filter``); on the first rejection the token is drawn from
  norm(max(p - q, 0)), and after k accepted drafts from p. The output is distributed
  as the model's own samples (Leviathan et al. 2023, Chen et al. 2023). A
  deterministic draft (prompt lookup, a greedy draft model) has q a point mass.

Drafters (``Drafter``): ``PromptLookupDrafter`` copies the continuation of the
longest n-gram match of the last tokens in the prompt and the history so far; no
second model. ``ModelDrafter`` runs a smaller Llama 2 with the same vocabulary with its
own KV cache, kept in step with the sequence by its common prefix (rejected drafts are
trimmed from it, a chat's earlier turns are reused).

Rejected drafts are trimmed from the model's cache (``BaseKVCache.trim``); a step
drafts no more tokens than every cache can trim exactly after it (``trimmable_after``:
a bounded cache past its window trims one). ``DraftLength`` adapts the number of
drafts to how many were accepted; at zero (after repeated misses, or when prompt
lookup finds no match) the steps are plain, pipelined ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx

from llama2_mlx.errors import Llama2Error, OptionError
from llama2_mlx.generation.sample import LogitsProcessor, greedy
from llama2_mlx.models.cache import common_prefix_length, make_cache, prefill

Dist = Callable[[mx.array], mx.array]  # (B, V) log-probabilities -> those drawn from (-inf: never)


@dataclass
class DraftStats:
    """Counts of one speculative generation: tokens drafted, drafts accepted, verify steps."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts per drafted token (0 when none was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


class Drafter(ABC):
    """Proposes tokens to follow a sequence (the model then verifies them)."""

    def check(self, model) -> None:
        """Raise ``OptionError`` if this drafter cannot draft for ``model``."""

    def can_draft(self, tokens: Sequence[int]) -> bool:
        """Whether ``draft`` would propose anything after ``tokens`` (a cheap test)."""
        return True

    @abstractmethod
    def draft(self, tokens: Sequence[int], k: int, dist: Optional[Dist] = None,
              processors: Sequence[LogitsProcessor] = ()) -> tuple[list[int], Optional[mx.array]]:
        """Up to ``k`` tokens to follow ``tokens`` (the whole sequence so far), and the
        (n, V) probabilities each was drawn from, or None when they were chosen
        deterministically. ``dist`` (None: greedy) and ``processors`` are the model's
        sampling transforms, for a drafter that samples."""


class PromptLookupDrafter(Drafter):
    """Drafts by prompt lookup: the tokens that followed the most recent earlier
    occurrence of the longest n-gram (``n`` tokens down to 2; down to 1 when ``n`` is 1)
    that ends the sequence.

    A longer match is trusted with a longer draft: at most 2^(m-2) tokens for an m-gram
    (1 for a bigram, 2 for a trigram, 4 for 4 tokens, ...). The n-grams are indexed incrementally as the
    sequence grows (a sequence that is not a continuation of the last one is indexed
    afresh); a draft that runs into the end of the sequence continues periodically (a
    repeated pattern).
    """

    def __init__(self, n: int):
        if n < 1:
            raise OptionError("{prompt_lookup} must be >= 1, got {got}", got=n)
        self.n = n
        self._seen: list[int] = []
        self._index: list[dict] = [{} for _ in range(n)]  # per size m: n-gram -> next position

    def _update(self, tokens: Sequence[int]) -> None:
        S = len(self._seen)
        if S > len(tokens) or list(tokens[:S]) != self._seen:
            self._seen, self._index, S = [], [{} for _ in range(self.n)], 0
        for i in range(max(S, 1), len(tokens)):  # the n-grams ending before position i
            for m in range(1, min(self.n, i) + 1):
                self._index[m - 1][tuple(tokens[i - m : i])] = i
        self._seen.extend(tokens[S:])

    def _match(self, tokens: Sequence[int]) -> tuple[Optional[int], int]:
        """(the position after the match, its length m), (None, 0) without one."""
        self._update(tokens)
        L = len(tokens)
        for m in range(min(self.n, L), min(2, self.n) - 1, -1):
            pos = self._index[m - 1].get(tuple(tokens[L - m :]))
            if pos is not None:
                return pos, m
        return None, 0

    def can_draft(self, tokens: Sequence[int]) -> bool:
        return self._match(tokens)[0] is not None

    def draft(self, tokens, k, dist=None, processors=()):
        pos, m = self._match(tokens)
        if pos is None or k < 1:
            return [], None
        L, out = len(tokens), []
        for p in range(pos, pos + min(k, 2 ** max(0, m - 2))):
            out.append(tokens[p] if p < L else out[p - L])
        return out, None


class ModelDrafter(Drafter):
    """Drafts with a smaller model of the same vocabulary (greedy, or sampled with the
    model's sampling transforms), with its own KV cache.

    The cache holds the tokens ``held``; each ``draft`` first trims it to the prefix
    they share with the new sequence (the rejected drafts, or a chat's changed tail) and
    runs the rest. The cache is unbounded (a drafter is small).
    """

    def __init__(self, model, prefill_step: int = 512):
        self.model, self.prefill_step = model, prefill_step
        self.cache = make_cache(model)
        self.held: list[int] = []

    def check(self, model) -> None:
        got, want = self.model.args.vocab_size, model.args.vocab_size
        if got != want:
            raise OptionError("{draft_model} has a vocabulary of {got} tokens, the model {want}: "
                              "a draft model needs the same tokenizer", got=got, want=want)

    def _sync(self, tokens: Sequence[int]) -> mx.array:
        """Trim the cache to the prefix it shares with ``tokens`` (at least the last token
        is left to run) and prefill all but the last of the rest; return the last (1, 1)."""
        n = min(common_prefix_length([self.held, tokens]), len(tokens) - 1)
        for c in self.cache:
            c.trim(c.offset - n)
        if any(c.offset != n for c in self.cache):
            self.cache, n = make_cache(self.model), 0
        return prefill(self.model, mx.array(list(tokens[n:]))[None], self.cache,
                       self.prefill_step)

    def draft(self, tokens, k, dist=None, processors=()):
        if k < 1:
            return [], None
        x = self._sync(tokens)
        history = mx.array(list(tokens))[None] if processors else None
        out, qs = [], []
        for i in range(k):
            logits = self.model(x, cache=self.cache)[:, -1, :].astype(mx.float32)
            for process in processors:
                logits = process(history, logits)
            if dist is None:
                y = greedy(logits)
            else:
                lq = dist(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
                y = mx.random.categorical(lq, axis=-1)
                qs.append(mx.exp(lq[0]))
            out.append(y)
            x = y.reshape(1, 1)  # lazily: the k steps are evaluated once, at the end
            if processors:
                history = mx.concatenate([history, x], axis=1)
        q = mx.stack(qs) if qs else None
        mx.eval(out, q) if q is not None else mx.eval(out)
        drafts = [int(y.item()) for y in out]
        # The last draft was not fed: the cache holds the sequence and all drafts but it.
        self.held = list(tokens) + drafts[:-1]
        return drafts, q


class DraftLength:
    """The adaptive number of drafts per step, between 0 and ``most``.

    All drafts accepted: double it (up to ``most``); some rejected: one more than were
    accepted. Two steps in a row with nothing accepted turn drafting off for a number
    of plain steps that doubles (up to 64) each time it happens again, and is reset
    when a draft is accepted.
    """

    def __init__(self, most: int):
        self.most = most
        self.k = most
        self.misses, self.backoff, self.skip = 0, 1, 0

    def next(self) -> int:
        """The number of drafts to propose now (0: a plain step)."""
        return 0 if self.skip else self.k

    def plain_step(self) -> None:
        """Count a plain step (while drafting is off)."""
        self.skip = max(0, self.skip - 1)

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt after a step that verified ``drafted`` drafts and accepted ``accepted``."""
        if accepted == drafted:
            self.k = min(self.most, 2 * self.k)
        else:
            self.k = max(1, accepted + 1)
        if accepted:
            self.misses, self.backoff = 0, 1
            return
        self.misses += 1
        if self.misses >= 2:
            self.skip, self.misses = self.backoff, 0
            self.backoff = min(64, 2 * self.backoff)


def make_drafter(config, draft_model=None) -> Optional[Drafter]:
    """The drafter of a ``GenerationConfig`` (its ``prompt_lookup``, or ``draft_model``:
    the loaded model given here, else the path loaded now); None without speculation."""
    if config.prompt_lookup is not None:
        return PromptLookupDrafter(config.prompt_lookup)
    if draft_model is None and config.draft_model is not None:
        draft_model = load_draft_model(config.draft_model)
    return None if draft_model is None else ModelDrafter(draft_model, config.prefill_step)


def load_draft_model(path: str, dtype: Optional[str] = None):
    """Load a draft model (a folder or Hugging Face repo id); errors name ``draft_model``."""
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.io.hub import resolve

    try:
        return load(resolve(path), dtype=dtype)[0]
    except Llama2Error as e:
        raise OptionError("{draft_model} {path}: {why}", path=path, why=str(e)) from None


def speculative_generate_step(
    model,
    prompt,
    drafter: Drafter,
    *,
    cache: Optional[list] = None,
    dist: Optional[Dist] = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    max_kv_size: Optional[int] = None,
    prefill_step: int = 512,
    max_tokens: Optional[int] = None,
    context: Optional[Sequence[int]] = None,
    num_draft_tokens: int = 4,
    stats: Optional[DraftStats] = None,
) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield (token, logprobs) for each new token after ``prompt`` (T,), as
    ``generate_step`` does for one sequence, drafting with ``drafter`` and verifying.

    ``dist`` is the sampler's distribution (``sample.make_filter``; None: greedy),
    applied after ``logits_processors``, which (like the drafter) see ``context``: the
    whole sequence that ends with ``prompt`` (default: ``prompt``; with a ``cache``
    that already holds the start of it). Each step drafts at most ``num_draft_tokens``
    (adapted by ``DraftLength``). ``stats`` (a ``DraftStats``) is updated as it goes.
    """
    prompt = prompt if isinstance(prompt, mx.array) else mx.array(prompt)
    if prompt.ndim != 1 or prompt.size == 0:
        raise Llama2Error("speculative decoding takes the tokens of one prompt")
    if num_draft_tokens < 1:
        raise OptionError("{num_draft_tokens} must be >= 1, got {got}", got=num_draft_tokens)
    drafter.check(model)
    cache = make_cache(model, max_kv_size) if cache is None else cache
    processors = list(logits_processors or [])
    tokens = list(context) if context is not None else prompt.tolist()
    stats = stats if stats is not None else DraftStats()
    policy = DraftLength(num_draft_tokens)

    def history() -> Optional[mx.array]:
        return mx.array(tokens)[None] if processors else None

    def plain(x: mx.array, hist: Optional[mx.array]) -> tuple[mx.array, mx.array]:
        logits = model(x, cache=cache)[:, -1, :].astype(mx.float32)
        for process in processors:
            logits = process(hist, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = greedy(logprobs) if dist is None else mx.random.categorical(dist(logprobs), axis=-1)
        return y[0], logprobs[0]

    prefill(model, prompt[None], cache, prefill_step)  # all but the last token

    n, pending, hist, more = 0, None, None, False
    while True:
        if n and n % 256 == 0:
            mx.clear_cache()
        if pending is not None:  # plain, pipelined steps: the next is queued before this is read
            y, logprobs = pending
            pending = None
            if more and (max_tokens is None or n + 1 < max_tokens):
                if processors:
                    hist = mx.concatenate([hist, y.reshape(1, 1)], axis=1)
                pending = plain(y.reshape(1, 1), hist)
                mx.async_eval(*pending)
            tokens.append(y.item())
            n += 1
            yield y, logprobs
            if n == max_tokens:
                return
            if more:
                policy.plain_step()
                more = not (policy.next() and drafter.can_draft(tokens))
            continue

        k = policy.next()
        if max_tokens is not None:
            k = min(k, max_tokens - n - 1)  # a step yields up to k + 1 tokens
        while k > 0 and any(c.trimmable_after(k + 1) < k for c in cache):
            k -= 1
        drafts, q = drafter.draft(tokens, k, dist, processors) if k > 0 else ([], None)
        drafts = drafts[:k]
        if q is not None:
            q = q[: len(drafts)]
        if not drafts:
            hist = history()
            pending, more = plain(mx.array([[tokens[-1]]]), hist), True
            mx.async_eval(*pending)
            continue

        d = len(drafts)
        logits = model(mx.array([[tokens[-1]] + drafts]), cache=cache)[0].astype(mx.float32)
        if processors:  # row i follows the sequence and the first i drafts
            rows = []
            for i in range(d + 1):
                row, h = logits[i : i + 1], mx.array(tokens + drafts[:i])[None]
                for process in processors:
                    row = process(h, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (d + 1, V)
        if dist is None:
            best = mx.argmax(logprobs, axis=-1).tolist()
            j = 0
            while j < d and drafts[j] == best[j]:
                j += 1
            out = drafts[:j] + [best[j]]
        else:
            drawn = dist(logprobs)
            j = _accepted(drawn, drafts, q)
            out = drafts[:j] + [_resample(drawn[j], drafts, q, j)]
        for c in cache:
            if c.trim(d - j) != d - j:
                raise Llama2Error("a KV cache could not forget the rejected drafts")
        stats.drafted += d
        stats.accepted += j
        stats.steps += 1
        policy.update(d, j)
        for i, t in enumerate(out):
            tokens.append(t)
            n += 1
            yield mx.array(t), logprobs[i]
            if n == max_tokens:
                return


def _accepted(logp: mx.array, drafts: list[int], q: Optional[mx.array]) -> int:
    """How many drafts the accept/reject rule keeps: draft i is accepted with probability
    min(1, p_i(x) / q_i(x)) (q a point mass when None), up to the first rejection."""
    idx = mx.array(drafts)[:, None]
    p = mx.exp(mx.take_along_axis(logp[: len(drafts)], idx, axis=-1)[:, 0])
    qx = mx.ones_like(p) if q is None else mx.take_along_axis(q, idx, axis=-1)[:, 0]
    u = mx.random.uniform(shape=p.shape)
    accept = (u * qx < p).tolist()
    return accept.index(False) if False in accept else len(drafts)


def _resample(logp: mx.array, drafts: list[int], q: Optional[mx.array], j: int) -> int:
    """The token after ``j`` accepted drafts: from p (``logp``) when all were accepted,
    else from the residual norm(max(p - q_j, 0)) of the rejected draft."""
    if j < len(drafts):
        p = mx.exp(logp)
        qj = (mx.arange(p.shape[-1]) == drafts[j]).astype(p.dtype) if q is None else q[j]
        residual = mx.maximum(p - qj, 0.0)
        # Rounding can leave no mass (p == q up to float error): then p itself.
        logp = mx.where(residual.sum() > 0, mx.log(residual), logp)
    return int(mx.random.categorical(logp).item())
