"""Run the bundled-model part of docs/walkthrough.md for real and put what it printed in
the doc.

    python scripts/walkthrough.py /tmp/walk            # run, write /tmp/walk/walkthrough.json
    python scripts/walkthrough.py /tmp/walk --update   # ... and rewrite the doc's outputs
    python scripts/walkthrough.py /tmp/walk --update --reuse   # the doc from that run's json

Every ``llama2`` command of the doc's ```console blocks runs in bash, in order, in the
folder given (which must not exist yet: the doc's run is in an empty folder), with stderr
sent to stdout as a terminal shows them; ``llama2 chat`` gets the doc's ``>>>`` lines as
its input (``llama2 serve`` is not run: its shown output stays). The doc shows each
command's output as printed, but for the progress lines of other commands than
lora-train (a terminal shows a bar there) and the demo model's note after its first time
(shortened to ``...``). The prose around the blocks (figures quoted
in sentences, the tables) is not touched: read the new outputs and update it by hand.
tests/test_walkthrough.py compares the doc's outputs with a run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from walkthrough_doc import (  # noqa: E402
    DOC,
    PROGRESS_LINE,
    SECTION,
    console_blocks,
    doc_commands,
    parse_block,
)

NOTE = "note: no --model given, so this is the bundled demo model:"
# Commands shown but not run: a server runs until it is stopped (its output in the doc is
# kept as written; tests/test_serve.py starts one and drives it with the openai client).
NOT_RUN = ("llama2 serve",)


def shown(command, printed: str, seen_note: bool) -> list[str]:
    """The lines the doc shows for a command that ``printed`` this."""
    lines = printed.rstrip("\n").split("\n") if printed.strip() else []
    if command.variable:
        return []  # NAME=$(...) shows nothing: its stdout went into $NAME
    if command.name == "chat":
        # stderr's ">>> " prompts, each followed by the answer to the line typed there
        head, *answers = "\n".join(lines).split(">>> ")
        lines = head.rstrip("\n").split("\n") if head.strip() else []
        for typed, answer in zip(command.chat_input, answers):
            lines.append(f">>> {typed}")
            lines += [x for x in answer.rstrip("\n").split("\n") if x]
    if command.name != "lora-train":
        lines = [x for x in lines if not PROGRESS_LINE.match(x)]
    if seen_note:
        lines = [f"{NOTE} ..." if x.startswith(NOTE) else x for x in lines]
    return lines


def run(folder: Path) -> list[dict]:
    if folder.exists():
        sys.exit(f"{folder} exists: the walkthrough runs in an empty, new folder")
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    results, seen_note = [], False
    tic_all = time.perf_counter()
    for c in doc_commands():
        if not c.words or c.line.startswith(NOT_RUN):
            print(f"(not run: $ {c.line})", file=sys.stderr)
            continue
        line = c.line
        if c.variable:  # NAME=$(...): run the inner command, keep its stdout for later ones
            inner = line[len(c.variable) + 3 : -1]
        else:
            inner = line
        stdin = "".join(t + "\n" for t in c.chat_input) if c.name == "chat" else None
        tic = time.perf_counter()
        p = subprocess.run(["bash", "-c", inner + " 2>&1"], cwd=folder, env=env, input=stdin,
                           capture_output=True, text=True)
        seconds = time.perf_counter() - tic
        if p.returncode:
            sys.exit(f"$ {line}\n{p.stdout}{p.stderr}\nfailed with status {p.returncode}")
        if c.variable:
            env[c.variable] = p.stdout.strip().splitlines()[-1]
        out = shown(c, p.stdout, seen_note)
        seen_note |= NOTE in p.stdout
        results.append({"line": line, "seconds": round(seconds, 1), "output": out})
        print(f"$ {line}  ({seconds:.1f} s)\n" + "\n".join(out), file=sys.stderr, flush=True)
    print(f"all: {time.perf_counter() - tic_all:.1f} s", file=sys.stderr)
    (folder / "walkthrough.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def update(results: list[dict]) -> None:
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end
    by_line = {r["line"]: r for r in results}
    pieces, last = [], 0
    for a, b in console_blocks(text):
        if not start <= a < end:
            continue
        pieces.append(text[last:a])
        new = []
        for c in parse_block(text[a:b]):
            new += _command_lines(text[a:b], c.line)  # as the doc breaks its lines
            if c.line in by_line:
                new += by_line[c.line]["output"]
        pieces.append("\n".join(new) + "\n")
        last = b
    pieces.append(text[last:])
    DOC.write_text("".join(pieces))


def _command_lines(block: str, line: str) -> list[str]:
    """The doc's lines of the command ``line`` (with its backslash continuations)."""
    lines = block.splitlines()
    for i, x in enumerate(lines):
        if not x.startswith("$ "):
            continue
        j, cmd = i, x[2:]
        while cmd.endswith("\\"):
            j += 1
            cmd = cmd[:-1].rstrip() + " " + lines[j].strip()
        if cmd.strip() == line:
            return lines[i : j + 1]
    raise ValueError(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--update", action="store_true", help="rewrite the doc's outputs")
    ap.add_argument("--reuse", action="store_true",
                    help="take the outputs of the run already in FOLDER (its walkthrough.json)")
    args = ap.parse_args()
    if args.reuse:
        results = json.loads((args.folder / "walkthrough.json").read_text())
        commands = {c.line: c for c in doc_commands()}
        for r in results:  # shown() again, in case it changed since the run
            if commands[r["line"]].variable:
                r["output"] = []
    else:
        results = run(args.folder)
    if args.update:
        update(results)
        print(f"updated {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
