"""OpenAI response objects built from the engine's events.

A ``Reply`` collects the events of one request and writes them out either as one
response (``chat.completion`` / ``text_completion``) or as stream chunks
(``chat.completion.chunk`` / ``text_completion``), with ``usage``, ``finish_reason``,
ids and timestamps as the OpenAI API defines them; best_of's reward is the extension
field ``reward`` of a choice.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Optional

from llama2_mlx.generation.chat import StreamStrip
from llama2_mlx.serve.jobs import Delta, Done, Finish, TokenInfo
from llama2_mlx.serve.protocol import Prepared

SYSTEM_FINGERPRINT = "llama2-mlx"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text (SentencePiece's word marker as a space; a byte piece as the byte,
    backslash-escaped if it is not UTF-8 by itself) and its UTF-8 bytes."""
    piece = tokenizer.id_to_piece(token)
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        b = bytes([int(m.group(1), 16)])
        return b.decode("utf-8", errors="backslashreplace"), list(b)
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def usage(done: Done) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


class _Choice:
    def __init__(self, index: int, chat: bool):
        self.index = index
        # A chat answer is stripped at both ends, as `llama2 chat` shows it and as Meta's
        # format strips it when the answer is sent back in the history; one stripper for
        # the collected text, one for the stream (a request is one or the other).
        self.collected = StreamStrip() if chat else None
        self.streamed = StreamStrip() if chat else None
        self.text: list[str] = []
        self.tokens: list[TokenInfo] = []
        self.finish_reason: Optional[str] = None
        self.reward: Optional[float] = None
        self.offset = 0  # characters so far (completions' text_offset)


class Reply:
    """The response to one prepared request (``model``: the name it asked for)."""

    def __init__(self, prepared: Prepared, tokenizer):
        self.p, self.tokenizer = prepared, tokenizer
        self.chat = prepared.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = [_Choice(i, self.chat) for i in range(prepared.n)]
        self.done: Optional[Done] = None

    # ------------------------------------------------------------------ collecting

    def add(self, ev) -> None:
        if isinstance(ev, Delta):
            c = self.choices[ev.index]
            c.text.append(c.collected.add(ev.text) if c.collected else ev.text)
            c.tokens += ev.tokens
        elif isinstance(ev, Finish):
            c = self.choices[ev.index]
            c.finish_reason, c.reward = ev.reason, ev.reward
        elif isinstance(ev, Done):
            self.done = ev

    # ------------------------------------------------------------------ logprobs

    def _chat_logprobs(self, tokens: list[TokenInfo]) -> dict:
        def entry(i: int, lp: float) -> dict:
            text, b = token_text(self.tokenizer, i)
            return {"token": text, "logprob": lp, "bytes": b}

        return {"content": [
            {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
            for t in tokens], "refusal": None}

    def _completion_logprobs(self, c: _Choice, tokens: list[TokenInfo]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            text = token_text(self.tokenizer, t.id)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append(
                {token_text(self.tokenizer, i)[0]: lp for i, lp in t.top} if self.p.top_logprobs else None)
            out["text_offset"].append(c.offset)
            c.offset += len(text)
        return out

    def _logprobs(self, c: _Choice, tokens: list[TokenInfo]) -> Optional[dict]:
        if not self.p.logprobs:
            return None
        return self._chat_logprobs(tokens) if self.chat else self._completion_logprobs(c, tokens)

    # ------------------------------------------------------------------ one response

    def response(self) -> dict:
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            choice = {"index": c.index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                choice["text"] = text
            choice["logprobs"] = self._logprobs(c, c.tokens)
            choice["finish_reason"] = c.finish_reason
            if c.reward is not None:
                choice["reward"] = c.reward
            choices.append(choice)
        return {
            "id": self.id, "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created, "model": self.p.model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
            "usage": usage(self.done),
        }

    # ------------------------------------------------------------------ a stream

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {
            "id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created, "model": self.p.model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
        }
        if self.p.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunks(self) -> list[dict]:
        """A chat stream opens with the assistant role of every choice."""
        if not self.chat:
            return []
        return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]) for c in self.choices]

    def chunks(self, ev) -> list[dict]:
        """The stream chunks for one engine event."""
        if isinstance(ev, Delta):
            c = self.choices[ev.index]
            lp = self._logprobs(c, ev.tokens) if ev.tokens else None
            if self.chat:
                choice = {"index": c.index, "delta": {"content": c.streamed.add(ev.text)}}
            else:
                choice = {"index": c.index, "text": ev.text}
            choice.update(logprobs=lp, finish_reason=None)
            return [self._chunk([choice])]
        if isinstance(ev, Finish):
            body = {"delta": {}} if self.chat else {"text": ""}
            return [self._chunk([{"index": ev.index, **body, "logprobs": None,
                                  "finish_reason": ev.reason}])]
        if isinstance(ev, Done) and self.p.include_usage:
            chunk = self._chunk([])
            chunk["usage"] = usage(ev)
            return [chunk]
        return []
