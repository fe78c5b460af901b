"""SentencePiece tokenizer and the Llama 2 chat format (Meta's ``chat_completion``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from llama2_mlx.errors import Llama2Error, one_line
from llama2_mlx.io.readers import exists, read_bytes, read_json

MAX_TOKENIZER_BYTES = 64 << 20  # Llama 2's tokenizer.model is 500 KB

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

# The same format as a Jinja chat template, written into every exported model folder
# (tokenizer_config.json, with "legacy": true) and GGUF file, so that transformers'
# ``apply_chat_template``, mlx-lm and llama.cpp produce exactly ``encode_chat``'s ids:
# each finished exchange is "<s>[INST] user [/INST] answer </s>", the system prompt is
# folded into the first user turn, and every text segment is stripped as Meta strips it.
# ("legacy" keeps SentencePiece's dummy-prefix space after <s>, as Meta's encoder has it.)
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
ROLES = ("system", "user", "assistant")


def validate_messages(messages: Sequence[dict], *, where: str = "dialog") -> None:
    """Check roles (system?, user, assistant, user, ...) and refuse the chat-format tags.

    ``where`` prefixes the error (e.g. ``"train.jsonl line 7"``).
    """
    if not messages:
        raise Llama2Error(f"{where}: no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise Llama2Error(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise Llama2Error(f"{where}: message {i} has unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise Llama2Error(f"{where}: message {i} content is not a string")
        for tag in SPECIAL_TAGS:
            if tag in m["content"]:
                raise Llama2Error(
                    f"{where}: message {i} ({m['role']}) contains the reserved tag {tag!r}"
                )
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise Llama2Error(
                f"{where}: roles must alternate system?, user, assistant, user, ...; "
                f"got {m['role']!r} where {want!r} belongs"
            )
    if not turns:
        raise Llama2Error(f"{where}: a system message needs a user message after it")


def fold_system(messages: Sequence[dict]) -> list[dict]:
    """Meta folds the system prompt into the first user turn inside <<SYS>> tags."""
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        first = messages[1]
        folded = B_SYS + messages[0]["content"] + E_SYS + first["content"]
        messages = [{"role": "user", "content": folded}] + messages[2:]
    return messages


class Tokenizer:
    """The Llama 2 SentencePiece tokenizer (BOS 1, EOS 2 in the released model)."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = Path(model_path)
        if not exists(self.model_path):
            raise Llama2Error(f"{self.model_path}: tokenizer model not found")
        # Read here (a regular file, bounded), so sentencepiece never opens a FIFO or device.
        proto = read_bytes(self.model_path, MAX_TOKENIZER_BYTES)
        if not proto:
            raise Llama2Error(f"{self.model_path}: empty file, not a SentencePiece model")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError
            raise Llama2Error(
                f"{self.model_path}: not a SentencePiece model ({one_line(e, 100)})"
            ) from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()  # -1 in Llama 2: there is no padding token
        if not (0 <= self.bos_id < self.vocab_size and 0 <= self.eos_id < self.vocab_size):
            raise Llama2Error(
                f"{self.model_path}: the tokenizer has no BOS or EOS piece (bos_id "
                f"{self.bos_id}, eos_id {self.eos_id}), which Llama 2 needs"
            )

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def chat_segments(self, messages: Sequence[dict], *, where: str = "dialog"):
        """The chat encoding as runs of ids, each flagged True when it is a training target.

        Every finished (user, assistant) pair is ``BOS [INST] user [/INST] answer EOS``
        and contributes (prompt ids, False), (answer ids + EOS, True); a final
        user turn contributes (``BOS [INST] user [/INST]``, False). The runs
        concatenate to exactly Meta's ``chat_completion`` tokens.
        """
        validate_messages(messages, where=where)
        turns = fold_system(messages)
        segments: list[tuple[list[int], bool]] = []
        for user, answer in zip(turns[::2], turns[1::2]):
            prompt_text = f"{B_INST} {user['content'].strip()} {E_INST}"
            prompt = self.encode(prompt_text, bos=True)
            full = self.encode(f"{prompt_text} {answer['content'].strip()} ", bos=True, eos=True)
            # The answer starts after a space, so pieces never straddle the split;
            # the common prefix guards against a tokenizer that merges across it.
            n = 0
            while n < min(len(prompt), len(full) - 1) and prompt[n] == full[n]:
                n += 1
            segments += [(full[:n], False), (full[n:], True)]
        if len(turns) % 2 == 1:
            last = f"{B_INST} {turns[-1]['content'].strip()} {E_INST}"
            segments.append((self.encode(last, bos=True), False))
        return segments

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of Meta's ``chat_completion`` for a dialog ending with a user turn."""
        if messages and messages[-1].get("role") != "user":
            raise Llama2Error("dialog: the last message must be from the user")
        return [i for ids, _ in self.chat_segments(messages) for i in ids]

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns ids into text as they arrive, emitting only whole UTF-8 characters.

    Byte-fallback pieces (``<0xE6>`` ...) of one character are held back until
    the character is complete; a word's leading space is kept (except at the
    very start, as ``decode`` does).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []  # ids since the last word boundary
        self.sent = 0  # characters of decode(self.ids) already emitted
        self.started = False

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids)
        # decode() drops the first piece's "▁"; restore it after the first segment.
        if self.started and self.ids and self.tokenizer.id_to_piece(self.ids[0]).startswith("▁"):
            text = " " + text
        return text

    def add(self, token: int) -> str:
        """Add one id; return the new text that can be shown now (maybe empty)."""
        piece = self.tokenizer.id_to_piece(token)
        out = ""
        if piece.startswith("▁") and self.ids:
            out = self.flush()  # a word boundary: restart decoding here (keeps this O(n))
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return out  # an incomplete UTF-8 character
        out += text[self.sent :]
        self.sent = len(text)
        return out

    def flush(self) -> str:
        """Everything not yet emitted (at the end of generation or a boundary)."""
        text = self._text()[self.sent :] if self.ids else ""
        if self.ids:
            self.started = True
        self.ids, self.sent = [], 0
        return text


def train_tokenizer(
    corpus: Sequence[str | os.PathLike], out_prefix: str | os.PathLike, vocab_size: int,
    *, num_threads: int = 2,
) -> Path:
    """Train a SentencePiece model by Llama 2's recipe: BPE, digits split, byte fallback.

    Writes ``<out_prefix>.model`` and returns its path.
    """
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in corpus), model_prefix=str(out_prefix),
        vocab_size=vocab_size, model_type="bpe", split_digits=True, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        num_threads=num_threads, minloglevel=2,
    )
    return Path(f"{out_prefix}.model")


def carries_chat_template(folder) -> bool:
    """Whether a model folder carries a chat template (``chat_template`` in its
    tokenizer_config.json, as every exported folder does): prompts to such a model are
    sent in the chat format unless asked otherwise (as mlx-lm does)."""
    path = Path(folder) / "tokenizer_config.json"
    return path.is_file() and bool(read_json(path).get("chat_template"))
