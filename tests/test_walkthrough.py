"""docs/walkthrough.md must stay true: its commands run, and the figures they print are
the ones the doc shows (see walkthrough_doc.py for how a doc's output is read).

* ``test_walkthrough_commands_run``: every command of the bundled-model section, in
  order, shortened to a few steps (``SHORTEN``), so that none of them breaks;
* ``test_the_fast_commands_print_the_doc_s_figures``: the commands that take seconds
  (generate, chat, demo data / prompts / eval on the bundled model), exactly as the doc
  shows them, print exactly the doc's figures (timings, speeds and memory aside);
* ``test_the_whole_walkthrough_prints_the_doc_s_figures`` (slow: ``pytest --run-slow``,
  about 7 min alone on 2 cores): every command exactly as shown. Training and sampling
  are seeded and repeat exactly on one machine, but another BLAS or CPU rounds
  differently and a greedy answer or a sample can flip, so there a figure may be off by
  0.02 or 5% (decimals) and by 2 or 5% (integers, e.g. right answers out of 60);
  ``LLAMA2_WALKTHROUGH_EXACT=1`` asks for the exact figures (on the doc's machine).

Each ``llama2 ...`` command runs through Typer's CliRunner on ``cli.app.app`` in a
temporary folder (the doc's relative output folders land there); ``NAME=$(llama2 ...)``
sets ``$NAME`` for the commands after it. Without the bundled model (while it is being
trained) a tiny random model stands in for it and the figures are not compared.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner
from walkthrough_doc import (
    EXACT,
    Tolerance,
    compare,
    doc_commands,
    expand,
    parse_commands,
)

from cli.app import app

# Option -> the value it is run with here (few steps, few questions, short answers).
SHORTEN = {
    "--iters": "2",          # lora-train, reward-train, rs-loop fine-tunes
    "--iterations": "1",     # rs-loop rounds, ppo iterations
    "-k": "2",               # samples per prompt
    "--n": "6",              # demo data / pairs / prompts / dialogs / eval questions
    "--n-eval": "3",
    "--n-valid": "3",
    "--max-tokens": "8",
    "--val-every": "0",
    "--epochs": "1",
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
# The option naming what a command writes (checked to exist after it ran).
PRODUCES = {
    "demo data": "--out", "demo pairs": "--out", "demo prompts": "--out",
    "lora-train": "--adapter-path", "fuse": "--out", "reward-train": "--out",
    "rejection-sample": "--out", "rs-loop": "--out", "demo dialogs": "--out", "gatt": "--out",
    "ppo": "--out",
}
# What a command's stdout must show.
STDOUT = {
    "demo eval": r"accuracy \d\.\d{3} \(\d+/\d+\)",
    "eval": r"^model +tokens +NLL .*\nbase +\d+ +\d+\.\d{4} .*\nadapters/next +\d+ +\d+\.\d{4} .*of zero",
    "lora-train": r"^(val|test) loss \d",
    "reward-train": r"^held-out acc \d",
    "reward-eval": r"^accuracy \d",
    "rejection-sample": r"mean best reward .*\nmean median reward",
    "rs-loop": r"iteration 0 \(start\).*\niteration 1: mean best reward",
    "ppo": r"^iteration 0: held-out mean reward \d\.\d{4}, KL -?\d\.\d{4}\n"
           r"iteration 1: held-out mean reward",
}
# Every part of the walkthrough must be there.
REQUIRED = ("generate", "chat", "demo data", "demo eval", "lora-train", "plot", "eval", "fuse",
            "demo pairs", "reward-train", "reward-eval", "demo prompts", "rejection-sample",
            "rs-loop", "demo check", "demo dialogs", "gatt", "ppo")
# The commands that take seconds (on the bundled model alone).
FAST = {"generate", "chat", "demo path", "demo data", "demo prompts", "demo eval"}
# The whole run on another machine (see the module's doc).
ELSEWHERE = Tolerance(decimals=(0.02, 0.05), integers=(2, 0.05))


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


def test_the_doc_has_the_bundled_section_with_every_step():
    commands = doc_commands()
    names = {c.name for c in commands if c.words}
    for c in commands:
        assert not c.words or c.words[0] == "llama2", c.line
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, missing
    for cmd in NOT_RUN:
        assert any(c.line.startswith(cmd) for c in commands), f"NOT_RUN entry {cmd!r} is stale"
    # The first commands work in an empty folder (no "pip install -e ." there).
    assert commands[0].line.startswith("pip install") and " . " not in commands[0].line + " "
    assert any(c.line.startswith("mkdir ") for c in commands[:3])


def test_the_doc_parser_reads_outputs_and_figures():
    from walkthrough_doc import figures

    block = ("```console\n$ llama2 demo eval --skill next \\\n    --n 64\nnext: accuracy 0.750 (45/60)\n"
             "$ llama2 chat\n>>> hi\nhello\n```\n")
    c1, c2 = parse_commands(block)
    assert c1.line == "llama2 demo eval --skill next --n 64" and c1.name == "demo eval"
    assert c1.output == ["next: accuracy 0.750 (45/60)"] and c2.chat_input == ["hi"]
    shape, found = figures("trained 100 steps in 152.6s, 4,068 tokens/s, peak memory 0.06 GB "
                           "-> /tmp/walk/iter_03/x (pool 64, 14.8s)")
    assert shape == "trained # steps in #s, # tokens/s, peak memory # GB -> <path> (pool #, #s)"
    assert found == [("100", False), ("152.6", True), ("4,068", True), ("0.06", True),
                     ("64", False), ("14.8", True)]
    assert compare(["next: accuracy 0.750 (45/60)"], "next: accuracy 0.750 (45/60)\n") == []
    assert compare(["next: accuracy 0.750 (45/60)"], "next: accuracy 0.733 (44/60)\n") != []
    assert compare(["next: accuracy 0.750 (45/60)"], "next: accuracy 0.733 (44/60)\n",
                   ELSEWHERE) == []
    assert compare(["prompt: 14 tokens, 590.88 tok/s"], "prompt: 14 tokens, 9.1 tok/s") == []
    assert compare(["note: no --model given..."], "note: no --model given, so") == []
    assert compare(["a 1"], "b 1") == ["no line like 'a 1'"]


@pytest.fixture
def demo_model(monkeypatch, model_dir):
    """The bundled demo model, or the tiny test model standing in for it (then None)."""
    from llama2_mlx import demo

    try:
        return demo.default_model_path()
    except Exception:
        monkeypatch.setattr(demo, "default_model_path", lambda: model_dir)
        return None


def run_walkthrough(tmp_path, *, short: bool, select=None):
    """Run the section's llama2 commands in ``tmp_path``; yield (command, argv, result)
    for each one run (``select(command)`` False: skipped, and so is every command that
    reads what a skipped one wrote)."""
    runner = CliRunner()
    env: dict[str, str] = {}
    skipped_outputs: list[str] = []
    for c in doc_commands():
        if not c.words or any(c.line.startswith(k) for k in NOT_RUN):
            continue
        words = expand(c.words, env)
        assert words[0] == "llama2", c.line
        argv = shorten(words[1:]) if short else words[1:]
        name = c.name
        if select is not None and (not select(c) or any(
                a == o or a.startswith(o + "/") for a in argv for o in skipped_outputs)):
            if name in PRODUCES:
                skipped_outputs.append(option(argv, PRODUCES[name]))
            continue
        if name == "plot" and importlib.util.find_spec("matplotlib") is None:
            continue  # an optional extra
        argv += [a for a in EXTRA.get(name, []) if short and a not in argv]
        chat_input = None
        if name == "chat":
            chat_input = "".join(t + "\n" for t in c.chat_input)
            chat_input += "" if "/quit" in c.chat_input else "/quit\n"
        r = runner.invoke(app, argv, input=chat_input)
        assert r.exit_code == 0, f"{c.line}\n-> {argv}\n{r.output}\n{r.exception!r}"
        if c.variable is not None:
            env[c.variable] = r.stdout.strip()
            assert Path(env[c.variable]).is_dir(), r.stdout
        yield c, argv, r


def test_walkthrough_commands_run(tmp_path, monkeypatch, demo_model):
    monkeypatch.chdir(tmp_path)
    ran = []
    for c, argv, r in run_walkthrough(tmp_path, short=True):
        for a in argv:
            assert not a.startswith("/") or a.startswith(str(demo_model or "/")), \
                f"{c.line}: the walkthrough writes relative paths only ({a})"
        if c.name in PRODUCES:
            made = tmp_path / option(argv, PRODUCES[c.name])
            assert made.exists() and (made.is_file() or any(made.iterdir())), (c.line, made)
        if c.name in STDOUT:
            assert re.search(STDOUT[c.name], r.stdout, re.M), (c.line, r.stdout)
        if c.name == "generate":
            assert "generation:" in r.stderr
        if c.name == "chat":
            turns = [t for t in c.chat_input if not t.startswith("/")]
            assert r.stdout.count("\n") >= len(turns), r.stdout
        ran.append(c.name)
    assert set(REQUIRED) <= set(ran), ran


def _compare_runs(tmp_path, select, tolerance) -> tuple[list[str], int]:
    problems, compared = [], 0
    for c, _, r in run_walkthrough(tmp_path, short=False, select=select):
        problems += [f"$ {c.line}: {p}" for p in compare(c.output, r.output, tolerance)]
        compared += 1
    return problems, compared


def test_the_fast_commands_print_the_doc_s_figures(tmp_path, monkeypatch, demo_model):
    if demo_model is None:
        pytest.skip("the bundled demo model is missing (the figures are its)")
    monkeypatch.chdir(tmp_path)
    problems, compared = _compare_runs(tmp_path, lambda c: c.name in FAST, EXACT)
    assert not problems, "\n".join(problems)
    assert compared >= 8, compared


@pytest.mark.slow
def test_the_whole_walkthrough_prints_the_doc_s_figures(tmp_path, monkeypatch, demo_model):
    if demo_model is None:
        pytest.skip("the bundled demo model is missing (the figures are its)")
    monkeypatch.chdir(tmp_path)
    exact = os.environ.get("LLAMA2_WALKTHROUGH_EXACT") == "1"
    problems, compared = _compare_runs(tmp_path, None, EXACT if exact else ELSEWHERE)
    assert not problems, "\n".join(problems)
    assert compared == sum(1 for c in doc_commands() if c.words)
