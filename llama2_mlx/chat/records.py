"""Chat records: the JSONL shapes that hold a dialog, read by one set of rules.

Every data file that holds a dialog (``lora-train`` data, preference pairs, prompts,
responses to score) takes the same record shapes:

* ``{"messages": [...]}``: Llama 2 chat messages (system?, user, assistant, user, ...);
* ``{"prompt": ..., "system": ...}``: the prompt as a string (one user turn, after the
  optional ``"system"`` prompt) or as a list of messages;

with the answers the file's kind needs as fields after the prompt (``"completion"``,
``"chosen"`` and ``"rejected"``, ``"response"``), each checked as the assistant turn that
follows it. A prompts file also takes a bare JSON string as a prompt. Messages are
checked by ``tokenizer.validate_messages``; every error is one line that starts with
the record's file and line.

Two optional flags:

* ``"train": false`` on an assistant message of a ``lora-train`` dialog: no loss on that
  answer (its tokens and EOS are context only; Ghost Attention's earlier turns, §3.3).
  The default is ``true``; only assistant messages take it (``trained_answers``).
* ``"safety": true`` on a prompt record: a safety prompt, whose combined reward is the
  safety reward model's (§3.2.6, ``rlhf.gate``). The default is ``false``
  (``safety_flag``, ``read_flagged_prompts``).

An answer ends at the first chat-format tag (``cut_answer``): it could not be encoded
in a dialog otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from llama2_mlx.chat.tokenizer import SPECIAL_TAGS, validate_messages
from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.readers import read_jsonl

ANSWER_KEYS = ("completion", "chosen", "rejected", "response")

# What each kind of file needs when a record has no dialog (the start of its error).
SFT_NEEDS = "'prompt' and 'completion', 'messages' or 'text'"
PROMPT_NEEDS = "a 'prompt' or 'messages'"
RESPONSE_NEEDS = ("a 'response' (or 'completion') with a 'prompt', "
                  "or 'messages' ending with an assistant turn")


def read_records(path, *, strings: bool = False) -> list[tuple[str, dict]]:
    """``(where, record)`` for every record of a JSONL file; ``where`` (``"<path> line
    <n>"``) starts every error about the record. ``strings``: a bare JSON string is the
    prompt record ``{"prompt": s}``."""
    path = Path(path)  # named as read_jsonl names it
    return [(f"{path} line {n}", rec) for n, rec in read_jsonl(path, strings=strings)]


def string_field(record: dict, key: str, where: str) -> str:
    """``record[key]``, which must be a string."""
    value = record[key]
    if not isinstance(value, str):
        raise Llama2Error(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def has_dialog(record: dict) -> bool:
    """Whether the record has any of the fields of a dialog record."""
    return any(k in record for k in ("messages", "prompt", *ANSWER_KEYS))


def dialog_of(record: dict, where: str, *, needs: str = PROMPT_NEEDS) -> list[dict]:
    """The record's messages (checked): its ``"messages"``, or its ``"prompt"`` (a string
    after the optional ``"system"``, or a list of messages). ``needs`` says what the file
    wants when the record has neither."""
    if "messages" in record and "prompt" in record:
        raise Llama2Error(f"{where}: has both 'prompt' and 'messages' (give one)")
    key = "messages" if "messages" in record else "prompt"
    if key not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise Llama2Error(f"{where}: needs {needs} (has {keys})")
    value = record[key]
    if isinstance(value, str) and key == "prompt":
        messages = [{"role": "user", "content": value}]
        if "system" in record:
            messages.insert(0, {"role": "system", "content": string_field(record, "system", where)})
    elif isinstance(value, list):
        if "system" in record:
            raise Llama2Error(f"{where}: 'system' goes with a string 'prompt'; "
                              f"put the system message first in {key!r}")
        messages = value
    else:
        what = "a string or a list of messages" if key == "prompt" else "a list of messages"
        raise Llama2Error(f"{where}: {key!r} must be {what}, got {type(value).__name__}")
    validate_messages(messages, where=where)
    return list(messages)


def prompt_of(record: dict, where: str, *, needs: str = PROMPT_NEEDS) -> list[dict]:
    """The record's dialog as a prompt: it must end with a user turn."""
    return _ends_with_user(dialog_of(record, where, needs=needs), where)


def _ends_with_user(messages: list[dict], where: str) -> list[dict]:
    if messages[-1]["role"] != "user":
        raise Llama2Error(f"{where}: the prompt's last message must be from the user")
    return messages


def answer_of(record: dict, key: str, prompt: Sequence[dict], where: str, *,
              empty_ok: bool = False) -> str:
    """The answer to ``prompt`` in ``record[key]``: a string (not blank, unless
    ``empty_ok``), checked as the assistant turn after the prompt."""
    what = "a string" if empty_ok else "a non-empty string"
    if key not in record:
        raise Llama2Error(f"{where}: has no {key!r} ({key!r} must be {what})")
    value = record[key]
    if not isinstance(value, str) or not (empty_ok or value.strip()):
        raise Llama2Error(f"{where}: {key!r} must be {what}")
    validate_messages(list(prompt) + [{"role": "assistant", "content": value}], where=where)
    return value


def sft_dialog(record: dict, where: str) -> list[dict]:
    """The dialog of a ``lora-train`` record: its messages as they are (every assistant
    turn is trained on unless it says ``"train": false``, see ``trained_answers``), or a
    prompt and its ``"completion"`` (which may be empty: the answer is then EOS alone).
    ``{"text"}`` records are not dialogs (``has_dialog``)."""
    messages = dialog_of(record, where, needs=SFT_NEEDS)
    trained_answers(messages, where)
    # A "prompt" that ends with the user needs its answer; "messages" may end anywhere.
    if "completion" in record or ("prompt" in record and messages[-1]["role"] == "user"):
        prompt = _ends_with_user(messages, where)
        answer = answer_of(record, "completion", prompt, where, empty_ok=True)
        messages = prompt + [{"role": "assistant", "content": answer}]
    return messages


def trained_answers(messages: Sequence[dict], where: str) -> list[bool]:
    """Whether each assistant message (in order) is trained on: its ``"train"`` flag, a
    JSON boolean, true when absent. Any other message with a ``"train"`` is an error."""
    flags = []
    for i, m in enumerate(messages):
        if "train" in m:
            if m["role"] != "assistant":
                raise Llama2Error(f"{where}: message {i} ({m['role']}) has 'train'; only "
                                  f"assistant messages take it")
            if not isinstance(m["train"], bool):
                raise Llama2Error(f"{where}: message {i}: 'train' must be true or false, "
                                  f"got {type(m['train']).__name__}")
        if m["role"] == "assistant":
            flags.append(m.get("train", True))
    return flags


def safety_flag(record: dict, where: str) -> bool:
    """The record's ``"safety"`` flag (a JSON boolean; false when absent)."""
    value = record.get("safety", False)
    if not isinstance(value, bool):
        raise Llama2Error(f"{where}: 'safety' must be true or false, got {type(value).__name__}")
    return value


def prompt_record(record: dict, where: str) -> list[dict]:
    """The prompt of a prompts-file record: the dialog of any record shape, without a
    final assistant turn (so ``lora-train`` data and pairs are prompts files too)."""
    messages = dialog_of(record, where)
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def read_prompts(path) -> list[list[dict]]:
    """The prompts of a JSONL file (see ``prompt_record``; bare JSON strings too), each
    chat messages ending with a user turn."""
    return [prompt_record(rec, where) for where, rec in read_records(path, strings=True)]


def read_flagged_prompts(path) -> tuple[list[list[dict]], list[bool]]:
    """The prompts of ``read_prompts`` and each one's ``"safety"`` flag (``safety_flag``)."""
    prompts, flags = [], []
    for where, rec in read_records(path, strings=True):
        prompts.append(prompt_record(rec, where))
        flags.append(safety_flag(rec, where))
    return prompts, flags


def response_of(record: dict, where: str, *, empty_ok: bool = False) -> tuple[list[dict], str]:
    """(prompt, response) of a record to score: a ``"response"`` (or ``"completion"``)
    after the prompt, or a dialog that ends with the assistant's answer (not blank, unless
    ``empty_ok``)."""
    for key in ("response", "completion"):
        if key in record:
            prompt = prompt_of(record, where, needs=RESPONSE_NEEDS)
            return prompt, answer_of(record, key, prompt, where, empty_ok=empty_ok)
    messages = dialog_of(record, where, needs=RESPONSE_NEEDS)
    if messages[-1]["role"] != "assistant":
        raise Llama2Error(f"{where}: needs {RESPONSE_NEEDS}")
    prompt = messages[:-1]
    return prompt, answer_of(messages[-1], "content", prompt, f"{where}: last message",
                             empty_ok=empty_ok)


def cut_answer(text: str, stops: Sequence[str] = SPECIAL_TAGS) -> tuple[str, bool]:
    """``text`` up to the first of ``stops`` (all of it when none occurs), and whether
    one did. By default the stops are the chat-format tags: an answer ends at the first
    of them."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)
