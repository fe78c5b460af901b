"""The serving engine: one thread runs every model call (MLX is not thread-safe for
building graphs from many threads), talking to the HTTP side through queues.

Each iteration of its loop takes new requests and cancellations from its inbox,
prefills waiting prompts (reusing the longest prefix in the prompt cache; a long
prompt in chunks, at most about ``prefill_step`` tokens per iteration so decoding
never stalls for long) and runs *one* batched decode step for every sequence that
is decoding (continuous batching: a request joins the batch when its prefill is
done and leaves it when it is finished). The step for iteration t+1 is queued
(``mx.async_eval``) before the tokens of iteration t are read back.

The n samples of one request are prefilled once and decode as rows of the batch
over one copy of the prompt's keys and values (``DecodeBatch.add_group``). Sampling
is per request (its temperature, top-p/k, min-p, repetition penalty and seed); a
request's greedy output is the one it gets when served alone. Speculative
decoding (``drafter``): see solo.py.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Optional

import mlx.core as mx

from llama2_mlx.serve.batch import SeqCache, prefill_rows
from llama2_mlx.serve.jobs import Delta, Done, Failed, Finish, Job, TokenInfo
from llama2_mlx.serve.prompt_cache import LRUPromptCache
from llama2_mlx.serve.runs import Lane, Run, Sample, StepOut
from llama2_mlx.serve.solo import context, make_solo, next_token

log = logging.getLogger("llama2_mlx.serve")


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Serves ``Job``s for ``models`` ({name: (model, tokenizer)}) on one thread.

    ``max_concurrency`` bounds the sequences decoding at once (a request takes n or
    best_of of them; the rest wait in arrival order); ``prompt_cache_bytes`` the prompt
    cache; ``reward_model`` (a ``RewardModel``, or a ``rlhf.gate.RewardScorer`` of a
    helpfulness and a safety model: the gated reward of §3.2.6) scores best_of samples.
    """

    def __init__(self, models: dict, *, max_concurrency: int = 16,
                 prompt_cache_bytes: int = 1 << 30, prefill_step: int = 512,
                 reward_model=None, drafter=None, num_draft_tokens: int = 6):
        self.lanes = {name: Lane(name, m, t) for name, (m, t) in models.items()}
        self.max_concurrency = max_concurrency
        self.prefill_step = prefill_step
        self.reward_model = reward_model
        self.drafter, self.num_draft_tokens = drafter, num_draft_tokens
        self.cache = LRUPromptCache(prompt_cache_bytes)
        self.inbox: "queue.Queue" = queue.Queue()
        self.waiting: deque[Run] = deque()
        self.runs: dict[int, Run] = {}  # id(job) -> run, admitted or waiting
        self.active_rows = 0
        self.stats = dict(requests=0, completed=0, cancelled=0, failed=0, prefilled_tokens=0,
                          prefill_calls=0, cached_tokens=0, generated_tokens=0, decode_steps=0,
                          max_batch=0, drafted_tokens=0, accepted_tokens=0)
        self._thread: Optional[threading.Thread] = None
        self._running = False

    # --------------------------------------------------------------- the HTTP side's API

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llama2-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what is still in flight (503) and end the thread."""
        if self._thread is not None:
            self.inbox.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self.inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        """Stop ``job`` (its client went away): its sequences leave the batch."""
        job.cancelled = True
        self.inbox.put(("cancel", job))

    def status(self) -> dict:
        return {
            "queued_requests": len(self.waiting),
            "active_requests": len(self.runs) - len(self.waiting),
            "decoding_sequences": sum(len(lane.rows) + (lane.solo is not None)
                                      for lane in self.lanes.values()),
            "prompt_cache": {"entries": len(self.cache), "bytes": self.cache.nbytes,
                             "max_bytes": self.cache.max_bytes},
            **self.stats,
        }

    # --------------------------------------------------------------- the loop

    def _loop(self) -> None:
        try:
            while True:
                busy = bool(self.waiting) or any(lane.rows or lane.inflight or lane.solo
                                                 for lane in self.lanes.values())
                if not self._drain(block=not busy):
                    break
                try:
                    self._admit()
                except Exception:  # fail the run being prefilled, live on
                    log.exception("prefill failed")
                    head = next((r for r in self.waiting if r.started), None)
                    if head is not None:
                        self._fail(head, 500, "the engine failed on this request")
                for lane in self.lanes.values():
                    if lane.solo is not None:
                        self._solo_step(lane)
                    if lane.rows or lane.inflight:
                        try:
                            self._advance(lane)
                        except Exception:
                            log.exception("decode step failed")
                            self._fail_lane(lane)
        finally:
            self._running = False
            for run in list(self.runs.values()):
                self._fail(run, 503, "the server is shutting down")
            for lane in self.lanes.values():
                lane.reset()
            self.cache.clear()
            # This thread's MLX streams must end with it: left to the thread's exit, their
            # destruction can race the process's and abort it ("terminate called ...").
            mx.synchronize()
            mx.clear_streams()

    def _drain(self, block: bool) -> bool:
        """Take the inbox's messages; False on stop."""
        try:
            msg = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, job = msg
            if kind == "stop":
                return False
            if kind == "submit":
                self._receive(job)
            elif kind == "cancel":
                self._cancel(job)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _receive(self, job: Job) -> None:
        if job.cancelled:
            return
        self.stats["requests"] += 1
        lane = self.lanes.get(job.model)
        if lane is None:
            job.emit([Failed(404, f"the model {job.model!r} is not served")])
            return
        try:
            run = Run(job, lane)
            if run.processors:
                run.history = mx.repeat(mx.array(job.prompt)[None], run.k, axis=0)
        except Exception as e:  # options the protocol should have refused
            job.emit([Failed(400, str(e))])
            return
        self.runs[id(job)] = run
        self.waiting.append(run)

    def _cancel(self, job: Job) -> None:
        run = self.runs.get(id(job))
        if run is not None:
            self.stats["cancelled"] += 1
            self._drop(run)

    def _fail(self, run: Run, status: int, message: str) -> None:
        if id(run.job) in self.runs:
            self.stats["failed"] += 1
            self._drop(run)
            run.outbox.append(Failed(status, message))
            self._flush(run)

    def _drop(self, run: Run) -> None:
        """Forget ``run``: out of the queue or the batch, its cache freed."""
        del self.runs[id(run.job)]
        if run in self.waiting:
            self.waiting.remove(run)
        if run.started:
            self.active_rows -= run.k
        run.started, run.kv, run.chunks = False, None, None
        lane = run.lane
        if lane.solo is not None and lane.solo.run is run:
            lane.solo = None
        if any(r.run is run for r in lane.rows):
            lane.keep([i for i, r in enumerate(lane.rows) if r.run is not run])
        for row in run.rows:
            row.done = True

    def _fail_lane(self, lane: Lane) -> None:
        runs = {id(r.run): r.run for r in lane.rows}.values()
        solo, _ = lane.solo, lane.reset()  # its arrays may be what failed: not touched again
        lane.solo = solo  # (decoding apart from the batch)
        for run in runs:
            self._fail(run, 500, "the engine failed on this request")

    # --------------------------------------------------------------- prefill

    def _admit(self) -> None:
        """Start the waiting runs that fit (in arrival order), then prefill: the short
        prompts of one model together as one batch (about ``prefill_step`` tokens in
        all), a long one alone in chunks of ``prefill_step``, one chunk per iteration."""
        for run in self.waiting:
            if not run.started:
                if self.active_rows and self.active_rows + run.k > self.max_concurrency:
                    break
                self._start_prefill(run)
        started = [r for r in self.waiting if r.started]
        if not started:
            return
        head = started[0]
        if len(head.todo) > self.prefill_step or head.chunks is not None:
            self._prefill_chunk(head)
            return
        group, total = [], 0
        for run in started:
            n = len(run.todo)
            if n > self.prefill_step or run.lane is not head.lane or (total + n > self.prefill_step
                                                                      and total):
                break
            group.append(run)
            total += n
        work = [r for r in group if r.todo]
        if work:
            model = head.lane.model
            try:
                contexts = prefill_rows(model, [r.kv for r in work], [r.todo for r in work])
            except Exception:
                log.exception("prefill failed")
                if len(work) == 1:
                    self._fail(work[0], 500, "the engine failed on this request")
                    return
                contexts = [self._prefill_alone(model, r) for r in work]  # which one was it?
            self.stats["prefilled_tokens"] += total
            self.stats["prefill_calls"] += 1
            for run, kv in zip(work, contexts):
                run.kv, run.todo = kv, []
        for run in group:
            if id(run.job) in self.runs:  # not failed above
                self.waiting.remove(run)
                self._join(run)

    def _prefill_alone(self, model, run: Run):
        try:
            return prefill_rows(model, [run.kv], [run.todo])[0]
        except Exception:
            log.exception("prefill failed")
            self._fail(run, 500, "the engine failed on this request")

    def _prefill_chunk(self, run: Run) -> None:
        if run.chunks is None:
            run.chunks = [SeqCache(run.kv[i] if run.kv else None)
                          for i in range(len(run.lane.model.layers))]
        chunk, run.todo = run.todo[: self.prefill_step], run.todo[self.prefill_step :]
        run.lane.model(mx.array(chunk)[None], cache=run.chunks)
        mx.eval([(c.keys, c.values) for c in run.chunks])
        self.stats["prefilled_tokens"] += len(chunk)
        self.stats["prefill_calls"] += 1
        if not run.todo:
            run.kv, run.chunks = [c.state() for c in run.chunks], None
            self.waiting.remove(run)
            self._join(run)

    def _start_prefill(self, run: Run) -> None:
        """The prompt but its last token is to be prefilled (the last one is the first
        decode step's input), after the longest prefix in the prompt cache."""
        ids = run.job.prompt
        n, run.kv = self.cache.lookup(run.lane.name, ids)
        run.cached, run.todo, run.started = n, list(ids[n:-1]), True
        self.active_rows += run.k
        self.stats["cached_tokens"] += n

    def _join(self, run: Run) -> None:
        """The prefilled run's rows join its lane's batch."""
        if run.kv is not None and run.cached < len(run.job.prompt) - 1:
            self.cache.insert(run.lane.name, run.job.prompt[:-1], run.kv)
        lane = run.lane
        alone = not (lane.rows or lane.inflight or lane.solo)
        if (self.drafter is not None and alone and run.k == 1 and not run.needs_logprobs
                and not run.job.top_logprobs):
            mx.random.seed(run.step_seed())
            lane.solo = make_solo(run, run.kv, self.drafter(), self.num_draft_tokens)
        else:
            lane.add(run, run.kv)
        run.kv = None

    def _solo_step(self, lane: Lane) -> None:
        run = lane.solo.run
        try:
            token, drafted, accepted = next_token(lane.solo, None if run.greedy else run.step_seed())
        except Exception:
            log.exception("speculative step failed")
            lane.solo = None
            return self._fail(run, 500, "the engine failed on this request")
        self.stats["drafted_tokens"] += drafted
        self.stats["accepted_tokens"] += accepted
        run.steps += 1
        self._on_token(run.rows[0], token, None, [])
        if run.rows[0].done:
            held = context(lane.solo, run.job.prompt + run.rows[0].tokens)
            if held is not None:  # kept for the prompt cache
                self.cache.insert(lane.name, *held)
            lane.solo = None
            if id(run.job) in self.runs:
                self._complete(run)
        self._flush(run)

    # --------------------------------------------------------------- decoding

    def _advance(self, lane: Lane) -> None:
        """Queue the next step for the lane's rows, then read back the previous one."""
        prev = lane.inflight
        lane.inflight = self._step(lane) if lane.rows else None
        if prev is not None:
            self._process(lane, prev)
        if self.stats["decode_steps"] % 256 == 0:
            mx.clear_cache()

    def _step(self, lane: Lane) -> StepOut:
        B = len(lane.rows)
        self.stats["decode_steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], B)
        x = lane.next.reshape(B, 1)
        lane.batch.begin_step()
        logits = lane.model(x, cache=lane.batch.layers)[:, -1, :].astype(mx.float32)
        lane.batch.end_step()
        pieces = lane.tokenizer.vocab_size
        if logits.shape[-1] > pieces:  # rows of a padded vocabulary could not be decoded
            pad = mx.full((B, logits.shape[-1] - pieces), -mx.inf, logits.dtype)
            logits = mx.concatenate([logits[:, :pieces], pad], axis=-1)
        segments = lane.segments
        if any(run.processors for run, _, _ in segments):
            parts = []
            for run, s, e in segments:
                part = logits[s:e]
                if run.processors:
                    if run.steps:
                        run.history = mx.concatenate([run.history, x[s:e]], axis=1)
                    for process in run.processors:
                        part = process(run.history, part)
                parts.append(part)
            logits = mx.concatenate(parts, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if all(run.greedy for run, _, _ in segments):
            y = mx.argmax(logprobs, axis=-1)
        else:
            parts = []
            for run, s, e in segments:
                if run.greedy:
                    parts.append(mx.argmax(logprobs[s:e], axis=-1))
                else:
                    mx.random.seed(run.step_seed())
                    parts.append(run.sampler(logprobs[s:e]))
            y = mx.concatenate(parts) if len(parts) > 1 else parts[0]
        for run, _, _ in segments:
            run.steps += 1
        out = StepOut(list(lane.rows), list(segments), y, None, {})
        if any(run.needs_logprobs for run, _, _ in segments):
            out.logprobs = mx.take_along_axis(logprobs, y[:, None], axis=-1)[:, 0]
        for run, s, e in segments:
            k = run.job.top_logprobs
            if k:
                ids = mx.argpartition(-logprobs[s:e], kth=k - 1, axis=-1)[:, :k]
                out.tops[id(run)] = (ids, mx.take_along_axis(logprobs[s:e], ids, axis=-1))
        lane.next = y
        mx.async_eval(y, *([out.logprobs] if out.logprobs is not None else []),
                      *[a for pair in out.tops.values() for a in pair])
        return out

    def _process(self, lane: Lane, out: StepOut) -> None:
        ys = out.y.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        tops = {key: (ids.tolist(), vals.tolist()) for key, (ids, vals) in out.tops.items()}
        finished: list[Sample] = []
        for run, s, e in out.segments:
            top = tops.get(id(run))
            for b in range(s, e):
                row = out.rows[b]
                if row.done:
                    continue  # cancelled, or finished at the previous step
                alts = []
                if top is not None:
                    pairs = zip(top[0][b - s], top[1][b - s])
                    alts = sorted(pairs, key=lambda p: -p[1])
                self._on_token(row, ys[b], lps[b] if lps is not None else None, alts)
                if row.done:
                    finished.append(row)
        if finished:
            for row in finished:
                if row.run.k == 1:
                    self._remember(lane, row)
            lane.keep([i for i, r in enumerate(lane.rows) if not r.done])
            for run in {id(r.run): r.run for r in finished}.values():
                if all(r.done for r in run.rows) and id(run.job) in self.runs:
                    self._complete(run)
        for run, _, _ in out.segments:
            self._flush(run)

    def _on_token(self, row: Sample, token: int, logprob: Optional[float], alts) -> None:
        run = row.run
        row.tokens.append(token)
        self.stats["generated_tokens"] += 1
        info = []
        if token == run.eos_id:
            text, reason = row.finish_text(), "stop"
            row.eos_logprob = logprob or 0.0
        else:
            row.logprob_sum += logprob or 0.0
            if run.job.logprobs:
                info = [TokenInfo(token, logprob, [(int(i), float(v)) for i, v in alts])]
            text, reason = row.stops.add(row.detok.add(token)), None
            if row.stops.hit:
                reason = "stop"
            elif len(row.tokens) >= run.job.config.max_tokens:
                text += row.finish_text()
                reason = "stop" if row.stops.hit else "length"
        if run.buffered:
            row.text.append(text)
            row.infos += info
        elif text or info:
            run.outbox.append(Delta(row.index, text, info))
        if reason is not None:
            row.done, row.reason = True, reason
            if not run.buffered:
                run.outbox.append(Finish(row.index, reason))

    def _remember(self, lane: Lane, row: Sample) -> None:
        """Keep a finished sequence's context (prompt and answer) in the prompt cache."""
        b = lane.rows.index(row)
        if b >= lane.batch.n_plain:
            return
        n = lane.batch.row_length(b)
        tokens = (row.run.job.prompt + row.tokens)[:n]
        if len(tokens) == n:
            self.cache.insert(lane.name, tokens, lane.batch.plain_row(b))

    def _complete(self, run: Run) -> None:
        job = run.job
        self._drop(run)
        if job.best_of is not None:
            try:
                chosen, rewards = self._best(run)
            except Exception:
                log.exception("scoring best_of samples failed")
                self.stats["failed"] += 1
                run.outbox.append(Failed(500, "scoring the best_of samples failed"))
                self._flush(run)
                return
            for i, row in enumerate(chosen):
                run.outbox.append(Delta(i, "".join(row.text), row.infos))
                run.outbox.append(Finish(i, row.reason, rewards[i] if rewards else None))
        self.stats["completed"] += 1
        run.outbox.append(Done(len(job.prompt), sum(r.completion_tokens for r in run.rows),
                               run.cached))
        self._flush(run)

    @staticmethod
    def _flush(run: Run) -> None:
        """Emit the run's pending events: every step while streaming, else at the end."""
        events = run.outbox
        if events and (run.job.stream or isinstance(events[-1], (Done, Failed))):
            run.outbox = []
            run.job.emit(events)

    def _best(self, run: Run):
        """The n best samples (best first) and, with a reward model, their rewards."""
        rows = run.rows
        if self.reward_model is not None:
            from llama2_mlx.rlhf.gate import as_scorer

            # prompt, answer and EOS: what the reward model was trained on
            seqs = [run.job.prompt + [t for t in row.tokens if t != run.eos_id] + [run.eos_id]
                    for row in rows]
            # No request is a safety prompt: the gate's threshold branch alone applies.
            scores = as_scorer(self.reward_model).score_tokens(seqs).rewards
        else:
            # The mean logprob of the returned tokens (OpenAI's "log probability per token").
            scores = [r.logprob_sum / r.completion_tokens if r.completion_tokens else r.eos_logprob
                      for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -scores[i])[: run.job.n]
        rewards = [scores[i] for i in order] if self.reward_model is not None else None
        return [rows[i] for i in order], rewards
