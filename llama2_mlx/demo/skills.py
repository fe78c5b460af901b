"""The walkthrough's data and scoring: new skills for the bundled demo model, preference
pairs, prompt files and greedy accuracy (``llama2 demo ...``).

A *skill* is a small question type the demo model was never trained on (``SKILLS``),
built like the tasks of ``llama2_mlx.demo.tasks``: a fixed question space split once
(by ``tasks.SPLIT_SEED``) into training and held-out questions, questions drawn from a
split by a seed, and a checker that recomputes the answer from the question text.
Every function here takes the name of a skill or of a bundled task
(``tasks.TASKS``), so the same calls make and score data for both:

* ``write_skill_data``: ``lora-train`` JSONL (train / valid / test) for a skill, with
  bundled-task examples replayed in the training file;
* ``write_pairs``: ``reward-train`` preference pairs, a right answer against a wrong
  one (a model's own, ``sampled_wrong_answers``, or a made-up one, ``wrong_answer``),
  the valid split from held-out questions;
* ``write_prompts``: prompts for ``rejection-sample``, ``rs-loop`` and ``ppo`` (the
  prompts of chosen tasks flagged ``"safety": true``, a stand-in for safety prompts);
* (``llama2_mlx.demo.dialogs``: multi-turn dialogs of these questions for ``gatt``);
* ``evaluate``: greedy accuracy (``batch_generate``, exact match after strip);
* ``check_file``: the checked accuracy of the answers in a JSONL file.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from llama2_mlx.demo import tasks as T
from llama2_mlx.errors import Llama2Error, OptionError, OptionText
from llama2_mlx.io.atomic import write_jsonl_atomic

# ----------------------------------------------------------------------------- skills


@dataclass(frozen=True)
class Skill:
    """A question type: ``templates`` filled from one item of ``items`` (a tuple of
    numbers named ``fields``), answered by ``answer(*item)``."""

    name: str
    description: str
    fields: tuple[str, ...]
    items: Callable[[], list[tuple[int, ...]]]
    answer: Callable[..., int]
    templates: tuple[str, ...]
    heldout_share: float = 0.2


SKILLS: dict[str, Skill] = {s.name: s for s in (
    Skill("next", "the number after n, 0 <= n <= 98", ("n",),
          lambda: [(n,) for n in range(99)], lambda n: n + 1,
          ("What number comes after {n}?", "What is the next number after {n}?",
           "Which number follows {n}?")),
    Skill("double", "twice n, 0 <= n <= 99", ("n",),
          lambda: [(n,) for n in range(100)], lambda n: 2 * n,
          ("Double {n}.", "What is twice {n}?", "What is {n} doubled?")),
    Skill("subtract", "a - b, 0 <= b <= a <= 99", ("a", "b"),
          lambda: [(a, b) for a in range(100) for b in range(a + 1)], lambda a, b: a - b,
          ("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}."),
          heldout_share=T.HELDOUT_SHARE),
)}

NAMES = tuple(SKILLS) + T.TASKS


def check_name(name: str) -> str:
    """``name`` if it is a skill or a bundled task, else a ``Llama2Error`` listing them."""
    if name not in SKILLS and name not in T.TASKS:
        raise Llama2Error(f"unknown skill or task {name!r} (skills: {', '.join(SKILLS)}; "
                          f"bundled tasks: {', '.join(T.TASKS)})")
    return name


_SPLITS: dict[str, dict[str, list]] = {}


def skill_split(skill: Skill, split: str) -> list[tuple[int, ...]]:
    """The items of ``split`` ("train" or "heldout"): fixed by ``tasks.SPLIT_SEED``."""
    if skill.name not in _SPLITS:
        items = skill.items()
        order = list(range(len(items)))
        random.Random(f"{T.SPLIT_SEED}:skill:{skill.name}").shuffle(order)
        held = set(order[: max(1, round(skill.heldout_share * len(items)))])
        _SPLITS[skill.name] = {
            "train": [x for i, x in enumerate(items) if i not in held],
            "heldout": [x for i, x in enumerate(items) if i in held],
        }
    return _SPLITS[skill.name][split]


def _regexes(skill: Skill) -> list[str]:
    out = []
    for t in skill.templates:
        r = re.escape(t)
        for name in skill.fields:
            r = r.replace(re.escape("{" + name + "}"), rf"(?P<{name}>\d+)")
        out.append(r)
    return out


def solve(name: str, question: str) -> str:
    """The right answer to ``question`` of a skill or task, computed from its text
    (ValueError if it cannot be parsed)."""
    if check_name(name) in T.TASKS:
        return T.solve(name, question)
    skill = SKILLS[name]
    for r in _regexes(skill):
        m = re.fullmatch(r, question)
        if m:
            return str(skill.answer(*(int(m[f]) for f in skill.fields)))
    raise ValueError(f"{name}: cannot parse question {question!r}")


def check(name: str, question: str, prediction: str) -> bool:
    """Whether ``prediction`` answers ``question`` (exact match after strip)."""
    return prediction.strip() == solve(name, question)


def examples(name: str, n: int, seed: int, split: str = "train",
             unique: bool = False) -> list[T.Example]:
    """``n`` questions of a skill or task from ``split`` (deterministic in ``seed``);
    ``unique``: distinct questions, at most as many as the split holds."""
    if check_name(name) in T.TASKS:
        return T.make_examples(name, n, seed, split, unique=unique)
    if split not in T.SPLITS:
        raise ValueError(f"unknown split {split!r}")
    skill = SKILLS[name]
    pool = skill_split(skill, split)
    if unique:
        questions = [(t, x) for x in pool for t in skill.templates]
        random.Random(f"{seed}:{name}:{split}").shuffle(questions)
        chosen = questions[:n]
    else:
        rng = random.Random(f"{seed}:{name}:{split}")
        chosen = [(rng.choice(skill.templates), rng.choice(pool)) for _ in range(n)]
    return [T.Example(name, t.format(**dict(zip(skill.fields, x))), str(skill.answer(*x)))
            for t, x in chosen]


# ----------------------------------------------------------------------------- files


@dataclass
class SkillDataWritten:
    """What ``write_skill_data`` wrote: records per file, how many of train.jsonl's
    are bundled-task replay (the rest are the new skill), and why valid.jsonl and
    test.jsonl have fewer records than asked, if they do."""

    records: dict[str, int]
    replay: int
    note: Optional[str] = None


def write_skill_data(name: str, out, *, n: int = 400, n_eval: int = 40, replay: float = 0.5,
                     seed: int = 0) -> SkillDataWritten:
    """``lora-train`` data for a skill (or task) in folder ``out``: ``train.jsonl`` and
    ``valid.jsonl`` / ``test.jsonl`` (``n_eval`` distinct held-out questions each, never
    seen in training), as ``{"messages": [user, assistant]}`` Llama 2 chat records.

    ``train.jsonl`` holds ``n`` training-split questions of ``name`` plus, mixed in, a
    ``replay`` share of questions of the bundled tasks (their training split, evenly
    spread): fine-tuning a small model on the new skill alone makes it forget the old
    ones. Returns a ``SkillDataWritten``.
    """
    check_name(name)
    if n < 1 or n_eval < 1:
        raise OptionError("{n} and {n_eval} must be at least 1")
    if not 0.0 <= replay < 1.0:
        raise OptionError("{replay} must be in [0, 1), got {got}", got=replay)
    held = examples(name, 2 * n_eval, seed, "heldout", unique=True)
    if len(held) < 2:
        raise Llama2Error(f"{name}: too few held-out questions")
    half = min(n_eval, len(held) // 2)
    n_old = round(n * replay / (1 - replay))
    old = [e for i, task in enumerate(T.TASKS)
           for e in T.make_examples(task, n_old // len(T.TASKS)
                                    + (i < n_old % len(T.TASKS)), seed, "train")]
    train = examples(name, n, seed, "train") + old
    random.Random(f"{seed}:{name}:replay").shuffle(train)
    files = {"train": train, "valid": held[:half], "test": held[half : 2 * half]}
    out = Path(out)
    for split, exs in files.items():
        write_jsonl_atomic(out / f"{split}.jsonl", [{"messages": T.to_messages(e)} for e in exs])
    note = None if half == n_eval else OptionText(
        "{n_eval} {asked}: {name} has {held} distinct held-out questions, and valid.jsonl and "
        "test.jsonl share none, so each has {half}", asked=n_eval, name=name,
        held=len(examples(name, 10**6, seed, "heldout", unique=True)), half=half)
    return SkillDataWritten({f"{split}.jsonl": len(exs) for split, exs in files.items()},
                            len(old), note)


def _near_number(answer: str, rng: random.Random) -> tuple[str, str]:
    n = int(answer)
    delta = rng.choice((-2, -1, 1, 2, -10, 10, rng.randint(3, 40)))
    wrong = n + delta if n + delta >= 0 else n + abs(delta)
    return str(wrong), "significantly_better" if abs(wrong - n) >= 10 else "better"


def _misspell(letters: str, rng: random.Random) -> str:
    w = letters.split(" ")
    i = rng.randrange(len(w))
    kind = rng.choice(("drop", "double", "swap", "change"))
    if kind == "drop" and len(w) > 1:
        w = w[:i] + w[i + 1:]
    elif kind == "swap" and len(w) > 1 and len(set(w)) > 1:
        while True:
            i = rng.randrange(len(w) - 1)
            if w[i] != w[i + 1]:
                break
        w[i], w[i + 1] = w[i + 1], w[i]
    elif kind == "change":
        w[i] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != w[i]])
    else:
        w.insert(i, w[i])
    return " ".join(w)


def wrong_answer(ex: T.Example, rng: random.Random) -> tuple[str, str]:
    """A wrong answer to ``ex`` and how much better the right one is (a rating of
    ``reward.RATINGS``): numbers off by a little ("better") or by 10 or more
    ("significantly_better"), a letter dropped, doubled, swapped or changed ("better"),
    the word spelt the wrong way round or another country's capital
    ("significantly_better")."""
    for _ in range(100):
        if ex.task in ("spell", "reverse"):
            if rng.random() < 0.25 and ex.answer != ex.answer[::-1]:
                wrong, rating = ex.answer[::-1], "significantly_better"
            else:
                wrong, rating = _misspell(ex.answer, rng), "better"
        elif ex.task == "capital":
            wrong, rating = rng.choice(T.CAPITALS)[1], "significantly_better"
        else:
            wrong, rating = _near_number(ex.answer, rng)
        if wrong != ex.answer:
            return wrong, rating
    raise ValueError(f"no wrong answer found for {ex}")


def _rating(ex: T.Example, wrong: str) -> str:
    if ex.answer.isdigit() and wrong.strip().isdigit():
        return "significantly_better" if abs(int(wrong) - int(ex.answer)) >= 10 else "better"
    return "better"


def sampled_wrong_answers(model, tokenizer, exs: Sequence[T.Example], *, k: int = 4,
                          temp: float = 1.0, max_tokens: int = 24, seed: int = 0,
                          batch_size: int = 64, progress: bool = False,
                          description: str = "sampling") -> list[Optional[str]]:
    """Per question, a wrong answer among ``k`` of the model's own samples (the first
    one that the checker rejects; None when all ``k`` were right). ``progress``: a
    progress bar over the questions."""
    from llama2_mlx.generation.generate import (
        GenerationConfig,
        batch_generate,
        prompt_ids,
    )
    from llama2_mlx.io.progress import ProgressBar

    config = GenerationConfig(max_tokens=max_tokens, temp=temp, seed=seed)
    rows = [e for e in exs for _ in range(k)]
    texts: list[str] = []
    with ProgressBar(description, len(exs), enabled=progress) as bar:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids = [prompt_ids(tokenizer, e.question, chat=True) for e in chunk]
            outs = batch_generate(model, tokenizer, ids, config)
            texts += [tokenizer.decode(x).strip() for x in outs]
            config.seed = None  # seeded once, then the stream goes on
            bar.update(min(len(texts) // k, len(exs)))
    out = []
    for j, e in enumerate(exs):
        wrong = [t for t in texts[j * k : (j + 1) * k] if t and not check(e.task, e.question, t)]
        out.append(wrong[0] if wrong else None)
    return out


def pair_records(names: Sequence[str], n: int, seed: int, split: str, *,
                 sampler: Optional[Callable] = None) -> list[dict]:
    """``n`` preference pairs per skill or task of ``names`` from ``split``, shuffled:
    ``{"prompt", "chosen", "rejected", "rating", "task", "source"}``. The rejected answer
    is a wrong one of ``sampler(examples)`` (the model's own, see
    ``sampled_wrong_answers``; ``sampler(examples, split)``) where it gave one, else a
    made-up one (``wrong_answer``)."""
    rng = random.Random(f"{seed}:pairs:{split}")
    records = []
    for name in names:
        exs = examples(name, n, seed, split, unique=split == "heldout")
        sampled = sampler(exs, split) if sampler is not None and exs else [None] * len(exs)
        for ex, own in zip(exs, sampled):
            wrong, rating = (own, _rating(ex, own)) if own else wrong_answer(ex, rng)
            records.append({"prompt": ex.question, "chosen": ex.answer, "rejected": wrong,
                            "rating": rating, "task": name,
                            "source": "model" if own else "made up"})
    rng.shuffle(records)
    return records


DEFAULT_PAIR_NAMES = T.TASKS


@dataclass
class PairsWritten:
    """What ``write_pairs`` wrote: pairs per file, and how many rejected answers are the
    model's own samples (the rest are made up)."""

    pairs: dict[str, int]
    from_model: int
    notes: list[str] = field(default_factory=list)

    @property
    def made_up(self) -> int:
        return sum(self.pairs.values()) - self.from_model


def write_pairs(out, names: Sequence[str] = DEFAULT_PAIR_NAMES, *, n: int = 100,
                n_valid: int = 20, seed: int = 0, model=None, k: int = 4,
                progress: bool = False) -> PairsWritten:
    """``reward-train`` data in folder ``out``: ``train.jsonl`` (``n`` pairs per skill or
    task of ``names``, training-split questions) and ``valid.jsonl`` (``n_valid`` pairs
    each, held-out questions): the checker's right answer is chosen over a wrong one,
    with ``model`` (a model folder or hub id) one of its own ``k`` samples where it got the question wrong (the
    mistakes a reward model must catch), else a made-up one (see ``wrong_answer``).
    ``progress``: progress bars while the model samples. Returns a ``PairsWritten``."""
    names = [check_name(x) for x in names]
    if not names:
        raise Llama2Error("no skills or tasks to make pairs of")
    if n < 1 or n_valid < 1 or k < 1:
        raise OptionError("{n}, {n_valid} and {k} must be at least 1")
    sampler = None
    if model is not None:
        from llama2_mlx.checkpoints.load import load

        net, tokenizer = load(model)

        def sample(exs, split):
            return sampled_wrong_answers(net, tokenizer, exs, k=k, seed=seed, progress=progress,
                                         description=f"sampling {exs[0].task} ({split})")
        sampler = sample
    files = {"train.jsonl": pair_records(names, n, seed, "train", sampler=sampler),
             "valid.jsonl": pair_records(names, n_valid, seed, "heldout", sampler=sampler)}
    for file, records in files.items():
        write_jsonl_atomic(Path(out) / file, records)
    notes = [OptionText("{n_valid} {asked}: {name} has {have} distinct held-out questions, so "
                        "valid.jsonl has {have} of its pairs", asked=n_valid, name=name, have=have)
             for name in names
             if (have := sum(r["task"] == name for r in files["valid.jsonl"])) < n_valid]
    return PairsWritten({file: len(records) for file, records in files.items()},
                        sum(r["source"] == "model" for rs in files.values() for r in rs), notes)


def write_prompts(out, names: Sequence[str], *, n: int = 32, seed: int = 0,
                  split: str = "heldout", safety_tasks: Sequence[str] = ()) -> int:
    """``n`` distinct questions per skill or task of ``names`` from ``split`` as JSONL
    ``{"prompt", "task"}`` lines (the input of ``rejection-sample``, ``rs-loop`` and
    ``ppo``); the prompts of the skills or tasks in ``safety_tasks`` (a subset of ``names``)
    also say ``"safety": true`` (the gate of §3.2.6 then scores them with the safety
    reward model alone). Returns the number of prompts."""
    names = [check_name(x) for x in names]
    if not names:
        raise Llama2Error("no skills or tasks to write prompts for")
    check_split(split)
    stray = [x for x in safety_tasks if x not in names]
    if stray:
        raise OptionError("{safety_tasks} must name tasks that prompts are written for ({names}), "
                          "not {got}", names=", ".join(names), got=", ".join(stray))
    records = [{"prompt": e.question, "task": name, **({"safety": True} if name in safety_tasks else {})}
               for name in names for e in examples(name, n, seed, split, unique=True)]
    write_jsonl_atomic(Path(out), records)
    return len(records)


def check_split(split: str) -> None:
    """An ``OptionError`` unless ``split`` is one of ``tasks.SPLITS``."""
    if split not in T.SPLITS:
        raise OptionError("{split} must be one of {SPLITS}, not {got!r}",
                          SPLITS=', '.join(T.SPLITS), got=split)


# ----------------------------------------------------------------------------- scoring


@dataclass
class EvalResult:
    """Greedy accuracy of a model on ``n`` questions of a skill or task."""

    name: str
    split: str
    right: int
    n: int
    rows: list[tuple[str, str, str, bool]] = field(default_factory=list)  # q, answer, output, ok

    @property
    def accuracy(self) -> float:
        return self.right / self.n if self.n else 0.0

    def summary(self) -> str:
        return f"{self.name} ({self.split}): accuracy {self.accuracy:.3f} ({self.right}/{self.n})"


def evaluate(model, tokenizer, name: str, *, n: int = 64, seed: int = 0,
             split: str = "heldout", batch_size: int = 32, max_tokens: int = 32) -> EvalResult:
    """Greedy answers (chat format, ``batch_generate``) to ``n`` distinct questions of
    ``split``, scored by the checker (exact match after strip)."""
    from llama2_mlx.generation.generate import (
        GenerationConfig,
        batch_generate,
        prompt_ids,
    )

    check_name(name)
    check_split(split)
    if n < 1 or batch_size < 1:
        raise OptionError("{n} and {batch_size} must be at least 1")
    exs = examples(name, n, seed, split, unique=True)
    config = GenerationConfig(max_tokens=max_tokens, temp=0.0)
    outputs: list[str] = []
    for i in range(0, len(exs), batch_size):
        chunk = exs[i : i + batch_size]
        ids = [prompt_ids(tokenizer, e.question, chat=True) for e in chunk]
        outputs += [tokenizer.decode(x) for x in batch_generate(model, tokenizer, ids, config)]
    rows = [(e.question, e.answer, o, check(name, e.question, o)) for e, o in zip(exs, outputs)]
    return EvalResult(name, split, sum(ok for *_, ok in rows), len(rows), rows)


def evaluate_model(model_path=None, name: str = "next", *, adapter_path=None,
                   **kwargs) -> EvalResult:
    """``evaluate`` on a model folder or hub id (default: the bundled demo model)
    with optional LoRA adapters."""
    from llama2_mlx import demo
    from llama2_mlx.checkpoints.load import load

    check_name(name)
    model, tokenizer = load(demo.model_or_demo(model_path), adapter_path=adapter_path)
    return evaluate(model, tokenizer, name, **kwargs)


def task_of(question: str) -> Optional[str]:
    """The skill or bundled task whose checker parses ``question`` (None: no such one)."""
    for name in NAMES:
        try:
            solve(name, question)
            return name
        except ValueError:
            continue
    return None


def check_file(path) -> dict[str, tuple[int, int]]:
    """Checked answers of a JSONL file of dialogs ending with the answer (``lora-train``
    data, the winners of ``rejection-sample``) or ``{"prompt", "response"}`` records
    (``records.response_of``): (right, total) per skill or task, found from the form of
    the question (the last user turn)."""
    from llama2_mlx.chat.records import read_records, response_of

    counts: dict[str, list[int]] = {}
    for where, rec in read_records(path):
        prompt, answer = response_of(rec, where, empty_ok=True)  # saying nothing is wrong, not bad data
        question = prompt[-1]["content"]
        name = task_of(question)
        if name is None:
            raise Llama2Error(f"{where}: no checker for {question!r}")
        c = counts.setdefault(name, [0, 0])
        c[0] += check(name, question, answer)
        c[1] += 1
    return {name: (right, n) for name, (right, n) in counts.items()}
