"""Ghost Attention (Touvron et al. 2023, §3.3): multi-turn data that teaches a model to
keep following an instruction given in the first turn.

For each dialog (its user turns) an instruction is drawn; it is appended to every user
turn and the assistant turns are sampled from the model turn by turn (``sample_k``: the
dialog so far prefilled once, K answers decoded as one batch; the best by a reward model
when one is given, else the first that ended with EOS). The record written keeps the
instruction in the first user turn only, and every answer but the last says
``"train": false`` (``chat.records``): the loss is zero on all tokens of the earlier
turns, so only the last answer, which followed an instruction it no longer sees in its
own turn, is learnt. The records are ``lora-train`` data.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx

from llama2_mlx.chat.records import cut_answer, read_records, string_field
from llama2_mlx.chat.tokenizer import SPECIAL_TAGS, validate_messages
from llama2_mlx.errors import Llama2Error, OptionError
from llama2_mlx.generation.generate import GenerationConfig, sample_k
from llama2_mlx.io.progress import ProgressBar, log_stderr
from llama2_mlx.io.readers import iter_lines, read_jsonl
from llama2_mlx.models.model import eval_mode
from llama2_mlx.rlhf.gate import RewardScorer
from llama2_mlx.rlhf.rejection import prompt_seed

OUT_NAME = "train.jsonl"


@dataclass
class GAttConfig:
    """How ``gatt`` samples: ``k`` answers per assistant turn drawn with ``generation``
    (its seed seeds the run: dialog ``i`` draws its instruction and answers with
    ``prompt_seed(seed, i)``); ``separator`` goes between a user turn and the appended
    instruction. A field's ``help`` is its ``gatt`` option's help text."""

    k: int = field(default=1, metadata={
        "help": "Samples per assistant turn (the best by --reward-model; without one the "
                "first that ended)."})
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_tokens=64, temp=0.7, seed=0))
    separator: str = field(default=" ", metadata={
        "help": "Text between a user turn and the instruction appended to it."})

    def check(self) -> None:
        if self.k < 1:
            raise OptionError("{k} must be at least 1 (got {got})", got=self.k)
        self.generation.check()


@dataclass
class Dialog:
    """The user turns of one dialog to sample (and its optional system prompt)."""

    users: list[str]
    system: Optional[str] = None
    where: str = ""


def dialog_turns(record: dict, where: str) -> Dialog:
    """The user turns of a dialogs-file record: ``{"messages": [...]}`` with an optional
    system message first, then user turns, with or without assistant turns between them
    (those are dropped: they are sampled anew)."""
    if "messages" not in record:
        raise Llama2Error(f"{where}: needs 'messages' (the dialog's user turns)")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise Llama2Error(f"{where}: 'messages' must be a non-empty list of messages")
    system = None
    if isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system = string_field(messages[0], "content", f"{where}: message 0")
        messages = messages[1:]
    users = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "assistant")]
    dialog = []
    for m in users:
        dialog += [m, {"role": "assistant", "content": ""}]
    if not users:
        raise Llama2Error(f"{where}: no user turn")
    # The alternating dialog the turns make, checked by the chat rules.
    validate_messages(([{"role": "system", "content": system}] if system is not None else [])
                      + dialog, where=where)
    return Dialog([m["content"] for m in users], system, where)


def read_dialogs(path) -> list[Dialog]:
    """The dialogs of a JSONL file (see ``dialog_turns``)."""
    return [dialog_turns(rec, where) for where, rec in read_records(path)]


def read_instructions(path) -> list[str]:
    """The instructions of a text file (one a line, blank lines skipped) or of a JSONL
    file (``.jsonl``: each line a JSON string or ``{"instruction": ...}``)."""
    path = Path(path)
    out: list[tuple[str, str]] = []
    if path.suffix == ".jsonl":
        for n, rec in read_jsonl(path, strings=True):
            where = f"{path} line {n}"
            key = "instruction" if "instruction" in rec else "prompt"
            if key not in rec:
                raise Llama2Error(f"{where}: needs 'instruction' (or a JSON string)")
            out.append((where, string_field(rec, key, where).strip()))
    else:
        from llama2_mlx.io.readers import exists

        if not exists(path):
            raise Llama2Error(f"{path}: instructions file not found")
        for n, line in iter_lines(path):
            where = f"{path} line {n}"
            try:
                text = line.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise Llama2Error(f"{where}: not UTF-8 text") from None
            if text:
                out.append((where, text))
    for where, text in out:
        if not text:
            raise Llama2Error(f"{where}: empty instruction")
        for tag in SPECIAL_TAGS:
            if tag in text:
                raise Llama2Error(f"{where}: contains the reserved tag {tag!r}")
    if not out:
        raise Llama2Error(f"{path}: no instructions")
    return [text for _, text in out]


def with_instruction(text: str, instruction: str, separator: str = " ") -> str:
    """A user turn with the instruction appended."""
    return f"{text.rstrip()}{separator}{instruction}"


def gatt_record(dialog: Dialog, answers: Sequence[str], instruction: str,
                separator: str = " ") -> dict:
    """The ``lora-train`` record of a sampled dialog: the instruction in the first user
    turn only, every answer but the last ``"train": false``."""
    if len(answers) != len(dialog.users):
        raise ValueError(f"{len(dialog.users)} user turns but {len(answers)} answers")
    messages = [{"role": "system", "content": dialog.system}] if dialog.system is not None else []
    last = len(answers) - 1
    for t, (user, answer) in enumerate(zip(dialog.users, answers)):
        content = with_instruction(user, instruction, separator) if t == 0 else user
        messages.append({"role": "user", "content": content})
        reply = {"role": "assistant", "content": answer}
        messages.append(reply if t == last else {**reply, "train": False})
    return {"messages": messages, "instruction": instruction}


def _pick(texts: Sequence[str], finished: Sequence[bool], rewards: Optional[Sequence[float]]) -> int:
    pool = [i for i, f in enumerate(finished) if f] or list(range(len(texts)))
    if rewards is None:
        return pool[0]
    return max(pool, key=lambda i: rewards[i])


def sample_dialog(policy, tokenizer, dialog: Dialog, instruction: str, config: GAttConfig,
                  scorer: Optional[RewardScorer] = None) -> list[str]:
    """The assistant answers of ``dialog`` with ``instruction`` appended to every user
    turn, sampled turn by turn (each turn sees the answers chosen before it)."""
    gen = dataclasses.replace(config.generation, seed=None)
    messages = [{"role": "system", "content": dialog.system}] if dialog.system is not None else []
    answers = []
    for user in dialog.users:
        messages.append({"role": "user", "content": with_instruction(user, instruction,
                                                                     config.separator)})
        outs, eos = sample_k(policy, tokenizer.encode_chat(messages), config.k, gen,
                             tokenizer.eos_id, tokenizer.vocab_size)
        texts, finished = [], []
        for ids, e in zip(outs, eos):
            text, cut = cut_answer(tokenizer.decode(ids))
            texts.append(text.strip())
            finished.append(e or cut)
        rewards = None
        if scorer is not None and config.k > 1:
            rewards = scorer.score_answers(messages, texts).rewards
        answer = texts[_pick(texts, finished, rewards)]
        answers.append(answer)
        messages.append({"role": "assistant", "content": answer})
    return answers


def gatt(policy, tokenizer, dialogs: Sequence[Dialog], instructions: Sequence[str],
         config: Optional[GAttConfig] = None, *, scorer: Optional[RewardScorer] = None,
         progress: bool = True) -> list[dict]:
    """The GAtt records of ``dialogs`` (see ``gatt_record``), dialog ``i`` with an
    instruction drawn with seed ``prompt_seed(seed, i)`` and answers sampled with it."""
    config = config or GAttConfig()
    config.check()
    if not dialogs:
        raise Llama2Error("no dialogs to sample")
    if not instructions:
        raise Llama2Error("no instructions")
    seed = config.generation.seed if config.generation.seed is not None else 0
    records = []
    with eval_mode(policy), ProgressBar("gatt", len(dialogs), ("turns {turns}",),
                                        enabled=progress) as bar:
        turns = 0
        for i, dialog in enumerate(dialogs):
            s = prompt_seed(seed, i)
            instruction = random.Random(s).choice(list(instructions))
            mx.random.seed(s)
            answers = sample_dialog(policy, tokenizer, dialog, instruction, config, scorer)
            records.append(gatt_record(dialog, answers, instruction, config.separator))
            turns += len(answers)
            bar.update(i + 1, turns=str(turns))
    return records


def gatt_files(model, dialogs_file, instructions_file, out_dir, config: Optional[GAttConfig] = None,
               *, adapter_path=None, reward_model=None, dtype=None, progress: bool = True,
               overwrite: bool = False, log: Callable[[str], None] = log_stderr) -> Path:
    """Load the model (``model`` [+ ``adapter_path``]; with ``reward_model``, that reward
    model on the same base), run ``gatt`` on the files and write ``out_dir/train.jsonl``
    atomically (``lora-train --data out_dir`` reads it; an earlier one is replaced only with
    ``overwrite``). The folder is claimed (locked, writable) before any model is loaded.
    Returns the file written."""
    from llama2_mlx.io.outdir import claim_output

    config = config or GAttConfig()
    config.check()
    dialogs = read_dialogs(dialogs_file)
    instructions = read_instructions(instructions_file)
    with claim_output(out_dir, field="out", artefacts=(OUT_NAME,), overwrite=overwrite,
                      say=log):
        return _gatt_files(model, dialogs, instructions, out_dir, config, adapter_path,
                           reward_model, dtype, progress, log)


def _gatt_files(model, dialogs, instructions, out_dir, config: GAttConfig, adapter_path,
                reward_model, dtype, progress, log) -> Path:
    from llama2_mlx.checkpoints.shared import SharedBase
    from llama2_mlx.io.atomic import write_jsonl_atomic

    base = SharedBase.load(model, dtype)
    policy, tokenizer = base.policy(adapter_path)
    scorer = None
    if reward_model is not None:
        from llama2_mlx.rlhf.gate import load_scorer

        scorer = load_scorer(reward_model, dtype=dtype, shared=base)
        if base.shared_by(scorer.helpful):
            log("the reward model shares the policy's base weights (one copy in memory)")
    records = gatt(policy, tokenizer, dialogs, instructions, config, scorer=scorer,
                   progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_jsonl_atomic(out / OUT_NAME, records)
