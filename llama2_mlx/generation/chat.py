"""Chat on top of ``generate``: ``ChatSession`` keeps a multi-turn dialog in the Llama 2
chat format, ``chat_loop`` reads turns and writes answers (with a few ``/`` commands),
``StreamStrip`` trims a streamed answer and ``format_stats`` prints a run's statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

from llama2_mlx.chat.tokenizer import SPECIAL_TAGS
from llama2_mlx.errors import Llama2Error
from llama2_mlx.generation.generate import GenerationConfig, Response, stream_generate
from llama2_mlx.generation.speculative import Drafter, make_drafter
from llama2_mlx.models.cache import PromptCache


class StreamStrip:
    """Strips a streamed text at both ends, as the chat format strips answers: leading
    whitespace is dropped and trailing whitespace held back until more text follows
    (at the end it is never shown)."""

    def __init__(self) -> None:
        self.started, self.held = False, ""

    def add(self, text: str) -> str:
        """Append a chunk; return what can be shown now."""
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        shown = text.rstrip()
        self.held = text[len(shown):]
        return shown


class ChatSession:
    """A multi-turn Llama 2 chat: the whole dialog is encoded in Meta's format for every
    turn, and the part of it already in the KV cache (``PromptCache``; all of it up to
    the new turn, as a rule) is not run again (``reuse_cache=False``: re-run it all).

    Generation also stops at the chat-format tags (``records.cut_answer``'s default
    stops: an answer holding one could not be encoded in the next turn). Answers are
    stripped (``StreamStrip``), as the format encodes them.

    With speculative decoding (``drafter``, else the config's ``prompt_lookup`` or
    ``draft_model``) one drafter serves every turn: a draft model's cache keeps the dialog.
    """

    def __init__(self, model, tokenizer, config: Optional[GenerationConfig] = None,
                 system: Optional[str] = None, reuse_cache: bool = True,
                 drafter: Optional[Drafter] = None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        config = config or GenerationConfig()
        self.config = dataclasses.replace(config, stop=list(config.stop) + list(SPECIAL_TAGS))
        self.drafter = drafter if drafter is not None else make_drafter(config)
        self.prompt_cache = PromptCache(model) if reuse_cache and config.max_kv_size is None else None
        self.reset()

    def reset(self) -> None:
        """Forget the dialog (the system prompt stays)."""
        self.messages: list[dict] = (
            [{"role": "system", "content": self.system}] if self.system else []
        )

    def send(self, user: str) -> Iterator[Response]:
        """Stream the answer to ``user``; the turn joins the history once it is finished."""
        messages = self.messages + [{"role": "user", "content": user}]
        ids = self.tokenizer.encode_chat(messages)
        answer, strip = [], StreamStrip()
        speculative = {"drafter": self.drafter} if self.drafter is not None else {}
        for r in stream_generate(self.model, self.tokenizer, ids, self.config, self.prompt_cache,
                                 **speculative):
            r.text = strip.add(r.text)
            answer.append(r.text)
            yield r
        self.messages = messages + [{"role": "assistant", "content": "".join(answer)}]


# The commands of ``chat_loop``, as /help lists them.
CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the history (the system prompt stays)",
    "/quit": "exit (so does the end of input, Ctrl-D)",
}
CHAT_HELLO = "chat: /help lists the commands, /quit exits"


def chat_loop(session: ChatSession, read: Callable[[], Optional[str]],
              write: Callable[[str], None], note: Callable[[str], None]) -> None:
    """Read user turns with ``read`` (None = end of input) and ``write`` the answers.

    ``/help`` lists the commands (``CHAT_COMMANDS``), ``/reset`` clears the history and
    ``/quit`` ends; a lone word that starts with ``/`` and is no command is not sent to
    the model. ``note`` gets messages for the user (errors of one turn do not end the
    chat), and an empty one at the end of input (the line the user's Ctrl-D left open).
    """
    while (line := read()) is not None:
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return
        if line == "/reset":
            session.reset()
            note("(history cleared)")
            continue
        if line == "/help" or (line.startswith("/") and " " not in line):
            if line != "/help":
                note(f"unknown command {line}")
            width = max(map(len, CHAT_COMMANDS))
            for name, what in CHAT_COMMANDS.items():
                note(f"  {name:<{width}}  {what}")
            continue
        try:
            for r in session.send(line):
                write(r.text)
            write("\n")
        except Llama2Error as e:
            note(f"error: {e}")
    note("")


def format_stats(r: Response) -> str:
    """The statistics of a final ``Response`` as lines for stderr."""
    return (
        f"prompt: {r.prompt_tokens} tokens"
        + (f" ({r.cached_tokens} from the cache)" if r.cached_tokens else "")
        + f", {r.prompt_tps:.2f} tok/s\n"
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.2f} tok/s\n"
        + (f"speculative: {r.accepted_tokens} of {r.drafted_tokens} drafted tokens accepted "
           f"({100 * r.acceptance_rate:.1f}%)\n" if r.drafted_tokens is not None else "")
        + f"peak memory: {r.peak_memory:.3f} GB\n"
        f"KV cache: {r.kv_cache_bytes} bytes ({r.kv_cache_bytes / 2**20:.2f} MiB)"
    )
