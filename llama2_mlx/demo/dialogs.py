"""GAtt dialogs for the bundled demo model (``llama2 demo dialogs``): multi-turn dialogs
(user turns only) of the demo tasks' questions, and the demo's instructions file, the
input of ``llama2 gatt`` (see benchmarks/gatt_experiment.py for what one GAtt round does
to the demo model)."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

from llama2_mlx.demo.skills import check_name, check_split, examples
from llama2_mlx.errors import Llama2Error, OptionError
from llama2_mlx.io.atomic import atomic_file, write_jsonl_atomic

# The instruction of the GAtt demo (benchmarks/gatt_experiment.py): a rule a checker can
# test on any answer with letters.
INSTRUCTIONS = ("Answer in uppercase.",)
# The tasks whose answers have letters (so that "Answer in uppercase." can be checked).
DIALOG_NAMES = ("spell", "reverse", "capital")


def parse_turns(text: str) -> tuple[int, int]:
    """``"2-5"`` -> (2, 5), ``"3"`` -> (3, 3): the number of user turns of a dialog."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    lo, hi = (int(m[1]), int(m[2] or m[1])) if m else (0, 0)
    if not m or not 1 <= lo <= hi:
        raise OptionError("{turns} must be N or LO-HI with 1 <= LO <= HI, not {got!r}",
                          got=str(text))
    return lo, hi


def dialogs(names: Sequence[str] = DIALOG_NAMES, n: int = 64, *, split: str = "train",
            seed: int = 0, turns: tuple[int, int] = (2, 5)) -> list[list[str]]:
    """``n`` dialogs of user turns: each ``turns[0]``..``turns[1]`` (uniform) distinct
    questions of the skills or tasks of ``names`` from ``split``, mixed (deterministic in
    ``seed``; held-out questions are distinct ones)."""
    names = [check_name(x) for x in names]
    if not names:
        raise Llama2Error("no skills or tasks to make dialogs of")
    check_split(split)
    lo, hi = turns
    if n < 1 or not 1 <= lo <= hi:
        raise OptionError("{n} must be at least 1 and {turns} 1 <= LO <= HI")
    rng = random.Random(seed)
    pool = list(dict.fromkeys(  # distinct questions, so that no dialog asks one twice
        ex.question for name in names
        for ex in examples(name, 4 * n * hi // len(names) + 8, seed, split,
                           unique=(split == "heldout"))))
    if len(pool) < hi:
        raise Llama2Error(f"{', '.join(names)} ({split}): {len(pool)} questions, fewer than "
                          f"{hi} turns")
    return [rng.sample(pool, lo if lo == hi else rng.randint(lo, hi)) for _ in range(n)]


def write_dialogs(out, names: Sequence[str] = DIALOG_NAMES, n: int = 64, *,
                  split: str = "train", seed: int = 0, turns: tuple[int, int] = (2, 5),
                  instructions_out=None) -> int:
    """``dialogs`` as ``gatt --dialogs`` JSONL (``{"messages": [user turns]}``) in file
    ``out``; with ``instructions_out``, ``INSTRUCTIONS`` there, one a line (``gatt
    --instructions``). Returns the number of user turns written."""
    ds = dialogs(names, n, split=split, seed=seed, turns=turns)
    write_jsonl_atomic(Path(out), [{"messages": [{"role": "user", "content": q} for q in d]}
                                   for d in ds])
    if instructions_out is not None:
        with atomic_file(Path(instructions_out)) as tmp:
            Path(tmp).write_text("".join(x + "\n" for x in INSTRUCTIONS), encoding="utf-8")
    return sum(len(d) for d in ds)
