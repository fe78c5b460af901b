"""docs/walkthrough.md as data: its commands, the output it shows for each, and the
figures in that output, for tests/test_walkthrough.py and scripts/walkthrough.py.

The ```console blocks of the section "With the bundled demo model" are parsed: ``$ ``
lines are commands (a trailing backslash continues them), ``>>> `` lines after
``llama2 chat`` are what is typed into the chat, and the lines up to the next command
are the output the doc shows (stdout and stderr as a terminal shows them).

Figures: every number of an output line, the line's *shape* being the line with each
number replaced by ``#`` (paths, which a run elsewhere prints otherwise, are masked
first). A figure followed by a unit of time, speed or memory (``0.5s``, ``tok/s``,
``tokens/s``, ``GB``) is *volatile*: it is never compared. A shown line ending in
``...`` stands for any line that starts like it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DOC = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"
SECTION = "## With the bundled demo model"
# Shell commands of the section other than llama2 ones (not run by the tests).
OTHER_COMMANDS = ("pip ", "mkdir ", "cd ", "curl ")

NUMBER = re.compile(r"(?<![\w.])-?\d(?:,?\d)*(?:\.\d+)?(?![\w.]*\d)")
PATH = re.compile(r"(?<![\w.~])/[^\s,;()']+")
VOLATILE_UNIT = re.compile(r"\s?(tok/s|tokens/s|s\b|GB\b)")
# Progress lines of a bar off a terminal ("sampling next (train) 30/150"); the doc shows
# lora-train's (its training loss between validations) and leaves the others out.
PROGRESS_LINE = re.compile(r"^[\w -]+(\([\w ]+\))? \d+/\d+(: .*)?$")


@dataclass
class Command:
    line: str
    chat_input: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)  # the lines the doc shows

    @property
    def words(self) -> list[str]:
        """The llama2 command's words (after a ``NAME=$(...)``), [] for other commands."""
        if self.line.startswith(OTHER_COMMANDS):
            return []
        m = re.fullmatch(r"(\w+)=\$\((.*)\)", self.line)
        return shlex.split(m[2] if m else self.line)

    @property
    def variable(self) -> Optional[str]:
        m = re.fullmatch(r"(\w+)=\$\((.*)\)", self.line)
        return m[1] if m else None

    @property
    def name(self) -> str:
        """``generate``, ``demo eval``, ... ('' for other commands)."""
        w = self.words[1:]
        return "" if not w else " ".join(w[:2]) if w[0] == "demo" else w[0]


def section_text(text: str) -> str:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end >= 0 else None]


def console_blocks(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the bodies of the ```console blocks of ``text``."""
    return [(m.start(1), m.end(1)) for m in re.finditer(r"```console\n(.*?)```", text, re.S)]


def parse_block(block: str) -> list[Command]:
    commands: list[Command] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            commands.append(Command(cmd.strip()))
        elif line.startswith(">>> ") and commands:
            commands[-1].chat_input.append(line[4:])
            commands[-1].output.append(line)
        elif commands:
            commands[-1].output.append(line)
        i += 1
    return commands


def parse_commands(text: str) -> list[Command]:
    """Every command of the console blocks of ``text``, in order."""
    return [c for start, end in console_blocks(text) for c in parse_block(text[start:end])]


def doc_commands() -> list[Command]:
    return parse_commands(section_text(DOC.read_text()))


def figures(line: str) -> tuple[str, list[tuple[str, bool]]]:
    """(shape, [(figure, volatile)]) of an output line."""
    masked = PATH.sub("<path>", line.rstrip())
    found, shape, last = [], [], 0
    for m in NUMBER.finditer(masked):
        shape.append(masked[last : m.start()] + "#")
        found.append((m[0], bool(VOLATILE_UNIT.match(masked, m.end()))))
        last = m.end()
    shape.append(masked[last:])
    return "".join(shape), found


def _value(figure: str) -> float:
    return float(figure.replace(",", ""))


@dataclass
class Tolerance:
    """How far a run's figure may be from the doc's: exact (the printed text) when
    ``decimals`` and ``integers`` are None; else within max(abs, rel * |doc's|)."""

    decimals: Optional[tuple[float, float]] = None  # (abs, rel) for figures with a point
    integers: Optional[tuple[float, float]] = None

    def accepts(self, doc: str, run: str) -> bool:
        if doc == run:
            return True
        tol = self.decimals if "." in doc else self.integers
        if tol is None:
            return False
        a, b = _value(doc), _value(run)
        return abs(a - b) <= max(tol[0], tol[1] * abs(a))


EXACT = Tolerance()


def compare(shown: list[str], printed: str, tolerance: Tolerance = EXACT) -> list[str]:
    """What of the ``shown`` output lines a run that ``printed`` this does not match: a
    line of the same shape must be there (in order among the lines of that shape) with
    the same figures (volatile ones aside), within ``tolerance``."""
    # (chat: stderr's ">>> " prompts run into the answers on stdout)
    lines = [re.sub(r"^(>>> )+", "", x) for x in printed.splitlines()]
    lines = [x for x in lines if x.strip()]
    used = [False] * len(lines)
    problems = []
    for want in shown:
        if not want.strip() or want.startswith(">>> "):
            continue
        if want.endswith("..."):
            if not any(x.startswith(want[:-3]) for x in lines):
                problems.append(f"no line starting {want[:-3]!r}")
            continue
        shape, want_figures = figures(want)
        match = next((i for i, x in enumerate(lines) if not used[i] and figures(x)[0] == shape),
                     None)
        if match is None:
            problems.append(f"no line like {want!r}")
            continue
        used[match] = True
        got = figures(lines[match])[1]
        for (w, volatile), (g, _) in zip(want_figures, got):
            if not volatile and not tolerance.accepts(w, g):
                problems.append(f"{want!r}: printed {lines[match]!r}")
                break
    return problems


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    """``$NAME`` / ``${NAME}`` replaced from ``env``."""
    return [re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env[m[1] or m[2]], w) for w in words]
