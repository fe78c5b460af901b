"""docs/walkthrough.md must keep working: every command of its bundled-model section is
run, in order, shortened to a few steps.

The ```console blocks of the section "With the bundled demo model" are parsed: ``$ ``
lines are commands (a trailing backslash continues them), ``>>> `` lines after
``llama2 chat`` are what is typed into the chat. Each ``llama2 ...`` command runs through
Typer's CliRunner on ``cli.app.app`` in a temporary folder (the doc's relative output
folders land there), after the substitutions of ``SHORTEN``; ``NAME=$(llama2 ...)`` sets
``$NAME`` for the commands after it. Without the bundled model (while it is being
trained) a tiny random model stands in for it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"
SECTION = "## With the bundled demo model"

# Option -> the value it is run with here (few steps, few questions, short answers).
SHORTEN = {
    "--iters": "2",          # lora-train, reward-train, rs-loop fine-tunes
    "--iterations": "1",     # rs-loop rounds
    "-k": "2",               # samples per prompt
    "--n": "6",              # demo data / pairs / prompts / eval questions
    "--n-eval": "3",
    "--n-valid": "3",
    "--max-tokens": "8",
    "--eval-every": "0",
}
# Paths rewritten to match: with --iterations 1 the last rs-loop round is iter_01.
RENAME = {r"\biter_\d\d\b": "iter_01"}
# Options added where the doc leaves them at their defaults.
EXTRA = {"chat": ["--max-tokens", "8"]}
# Commands of the section that are not run, with the reason.
NOT_RUN: dict[str, str] = {
    "llama2 serve": "a server runs until it is stopped: tests/test_serve.py starts it and "
                    "drives it with the openai client",
}
# Shell commands other than llama2 that the section may show (not run).
OTHER_COMMANDS = ("pip ", "curl ")
# The option naming what a command writes (checked to exist after it ran).
PRODUCES = {
    "demo data": "--out", "demo pairs": "--out", "demo prompts": "--out",
    "lora-train": "--adapter-path", "fuse": "--out", "reward-train": "--out",
    "rejection-sample": "--out", "rs-loop": "--out",
}
# What a command's stdout must show.
STDOUT = {
    "demo eval": r"accuracy \d\.\d{3} \(\d+/\d+\)",
    "eval": r"^model +tokens +NLL .*\nbase +\d+ +\d+\.\d{4} .*\nadapters/next +\d+ +\d+\.\d{4} .*of zero",
    "reward-train": r"^held-out acc \d",
    "reward-eval": r"^accuracy \d",
    "rejection-sample": r"mean best reward .*\nmean median reward",
    "rs-loop": r"iteration 0 \(start\).*\niteration 1: mean best reward",
}
# Every part of the walkthrough must be there.
REQUIRED = ("generate", "chat", "demo data", "demo eval", "lora-train", "eval", "fuse", "demo pairs",
            "reward-train", "demo prompts", "rejection-sample", "rs-loop")


@dataclass
class Command:
    line: str
    chat_input: list[str] = field(default_factory=list)


def section_text(text: str) -> str:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end >= 0 else None]


def parse_commands(text: str) -> list[Command]:
    """The ``$ `` commands of the ```console blocks of ``text`` (chat input attached)."""
    commands: list[Command] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
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
            i += 1
    return commands


def subcommand(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] == "demo" else argv[0]


def shorten(argv: list[str]) -> list[str]:
    out = list(argv)
    for pattern, new in RENAME.items():
        out = [re.sub(pattern, new, a) for a in out]
    for i, a in enumerate(out[:-1]):
        if a in SHORTEN:
            out[i + 1] = SHORTEN[a]
    return out


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    def one(w: str) -> str:
        return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env[m[1] or m[2]], w)

    return [one(w) for w in words]


def test_the_doc_has_the_bundled_section_with_every_step():
    commands = parse_commands(section_text(DOC.read_text()))
    names = set()
    for c in commands:
        if c.line.startswith(OTHER_COMMANDS):
            continue
        m = re.fullmatch(r"(\w+)=\$\((.*)\)", c.line)
        words = shlex.split(m[2] if m else c.line)
        assert words[0] == "llama2", c.line
        names.add(subcommand(words[1:]))
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, missing
    for cmd in NOT_RUN:
        assert any(c.line.startswith(cmd) for c in commands), f"NOT_RUN entry {cmd!r} is stale"


@pytest.fixture
def demo_model(monkeypatch, model_dir):
    """The bundled demo model, or the tiny test model standing in for it."""
    from llama2_mlx import demo

    try:
        return demo.default_model_path()
    except Exception:
        monkeypatch.setattr(demo, "default_model_path", lambda: model_dir)
        return model_dir


def test_walkthrough_commands_run(tmp_path, monkeypatch, demo_model):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    env: dict[str, str] = {}
    ran = []
    for c in parse_commands(section_text(DOC.read_text())):
        if c.line.startswith(OTHER_COMMANDS) or any(c.line.startswith(k) for k in NOT_RUN):
            continue
        var = None
        line = c.line
        if m := re.fullmatch(r"(\w+)=\$\((.*)\)", line):
            var, line = m[1], m[2]
        words = expand(shlex.split(line), env)
        assert words[0] == "llama2", line
        argv = shorten(words[1:])
        for a in argv:
            assert not a.startswith("/") or a.startswith(str(demo_model)), \
                f"{line}: the walkthrough writes relative paths only ({a})"
        name = subcommand(argv)
        argv += [a for a in EXTRA.get(name, []) if a not in argv]
        chat_input = "".join(t + "\n" for t in c.chat_input) + "/quit\n" if name == "chat" else None
        r = runner.invoke(app, argv, input=chat_input)
        assert r.exit_code == 0, f"{line}\n-> {argv}\n{r.stdout}\n{r.stderr}\n{r.exception!r}"
        if var is not None:
            env[var] = r.stdout.strip()
            assert Path(env[var]).is_dir(), r.stdout
        if name in PRODUCES:
            made = tmp_path / option(argv, PRODUCES[name])
            assert made.exists() and (made.is_file() or any(made.iterdir())), (line, made)
        if name in STDOUT:
            assert re.search(STDOUT[name], r.stdout, re.M), (line, r.stdout)
        if name == "generate":
            assert "generation:" in r.stderr
        if name == "chat":
            turns = [t for t in c.chat_input if not t.startswith("/")]
            assert r.stdout.count("\n") >= len(turns), r.stdout
        ran.append(name)
    assert set(REQUIRED) <= set(ran), ran
