"""Does Ghost Attention (§3.3) make the bundled demo model keep following a first-turn
instruction at later turns?

The demo model knows six toy tasks and no instructions, while GAtt needs a model that
already follows an instruction given in the *current* turn (the paper's RLHF model). So:

1. warm-up: a LoRA fine-tune of the demo model on 1-5-turn dialogs whose turns carry
   " Answer in uppercase." with probability 1/2, the answer upper-cased exactly in the
   turns that carry it; fused into a "warm" model. It follows the instruction in the turn
   that gives it and was taught not to carry it over to later turns.
2. before: 5-turn held-out dialogs (spelling, spelling backwards, capitals), the
   instruction in turn 1 only, answered greedily turn by turn; the rate of answers in
   uppercase at each turn. Also with the instruction in every turn (what GAtt samples
   with), and with no instruction at all (the control: uppercase without being asked).
3. ``llama2 gatt`` on training dialogs (2-5 turns) with the warm model, mixed with
   ``--mix`` other dialogs (2-5 turns) with no instruction, answered greedily by the warm
   model, only their last answer trained too; then ``llama2 lora-train`` on the mix (the
   warm model + new adapters).
4. after: the same measures on the GAtt-tuned model.

Run: ``python benchmarks/gatt_experiment.py [--workdir DIR] [--dialogs N] [--mix N] [--eval N]``.
Prints a table; the numbers are whatever they come out as.

One run of GAtt records alone (what ``--mix 0`` does; ``--warmup 800 --warmup-iters 150
--dialogs 120 --gatt-iters 80 --eval 32``, 2 shared CPU cores, 985 s; GAtt data: last
answer in uppercase in 90% of 120 dialogs):

| instruction | model | turn 1 | turn 2 | turn 3 | turn 4 | turn 5 |
|---|---|---|---|---|---|---|
| turn 1 only | before GAtt | 97% | 0% | 0% | 0% | 0% |
| turn 1 only | after GAtt | 91% | 94% | 100% | 94% | 97% |
| every turn | before GAtt | 97% | 100% | 97% | 94% | 88% |
| every turn | after GAtt | 91% | 97% | 100% | 100% | 100% |
| none (control) | before GAtt | 0% | 0% | 0% | 0% | 0% |
| none (control) | after GAtt | 100% | 91% | 97% | 94% | 91% |

Turns 3-5 with the instruction in turn 1 only go from 0% to 94-100%, but the control
shows why: after the GAtt fine-tune the model answers in uppercase with no instruction
at all. Trained on GAtt records alone (every one has the instruction and an uppercase
last answer) it learnt "always uppercase", not "remember turn 1". GAtt data would need
mixing with dialogs without the instruction (as the paper mixes it into its SFT/RLHF data)
before this measures instruction memory.

The same sizes with the mix (``--mix 120``, the default: 120 GAtt records plus 120
dialogs with no instruction, whose last answers are in uppercase in 0% of them; 2 shared
CPU cores, 545 s; GAtt data: last answer in uppercase in 95% of 120 dialogs):

| instruction | model | turn 1 | turn 2 | turn 3 | turn 4 | turn 5 |
|---|---|---|---|---|---|---|
| turn 1 only | before GAtt | 97% | 0% | 0% | 0% | 0% |
| turn 1 only | after GAtt | 94% | 81% | 78% | 69% | 78% |
| every turn | before GAtt | 97% | 100% | 97% | 94% | 88% |
| every turn | after GAtt | 94% | 100% | 97% | 94% | 94% |
| none (control) | before GAtt | 0% | 0% | 0% | 0% | 0% |
| none (control) | after GAtt | 6% | 9% | 12% | 6% | 6% |

With the mix the control stays low (6-12% uppercase with no instruction, against 91-100%
without the mix) while the instruction given in turn 1 only is still followed at turns
3-5 in 69-78% of the answers (0% before GAtt): most of the gain now comes from the
instruction in turn 1, not from a habit of uppercase, so this is instruction memory,
though weaker than the unmixed numbers suggested and not free of the habit (the control's
6-12% is the part the model does unasked; the gap to it, about 60-70 points at turns 3-5,
is what turn 1 adds). The same 80 iterations now cover twice the records, so each GAtt
record is seen half as often. One run, one seed, 32 held-out dialogs (one dialog is 3 points);
the GAtt data came out at 95% rather than 90% although the before-GAtt rows match the
earlier run exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama2_mlx.chat.records import cut_answer  # noqa: E402
from llama2_mlx.demo import default_model_path  # noqa: E402
from llama2_mlx.demo import dialogs as S  # noqa: E402
from llama2_mlx.demo import tasks as T  # noqa: E402

INSTRUCTION = S.INSTRUCTIONS[0]
TASKS = S.DIALOG_NAMES
TURNS = 5


def follows(answer: str) -> bool:
    """The rule: the answer has letters and all of them are uppercase."""
    return any(c.isalpha() for c in answer) and answer == answer.upper()


def llama2(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    tic = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cli.app", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"llama2 {' '.join(args)} failed:\n{r.stderr}")
    print(f"  llama2 {args[0]}: {time.perf_counter() - tic:.0f}s", file=sys.stderr)


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def warmup_records(n: int, seed: int) -> list[dict]:
    """``n`` dialogs of 1-5 turns; each turn carries the instruction with probability 1/2
    and its answer is upper-cased exactly when it does: the instruction is followed in
    the turn that gives it, never in the turns after it."""
    rng = random.Random(seed)
    pool = [ex for task in TASKS for ex in T.make_examples(task, n * 2, seed=seed)]
    out = []
    for _ in range(n):
        messages = []
        for ex in rng.sample(pool, rng.randint(1, TURNS)):
            given = rng.random() < 0.5
            messages += [{"role": "user", "content": f"{ex.question} {INSTRUCTION}" if given
                          else ex.question},
                         {"role": "assistant", "content": ex.answer.upper() if given else ex.answer}]
        out.append({"messages": messages})
    return out


def dialogs(n: int, split: str, seed: int, turns=None) -> list[list[str]]:
    """``n`` dialogs of user questions from the tasks (``turns``: fixed, else 2-5); the
    library's ``llama2 demo dialogs``."""
    return S.dialogs(TASKS, n, split=split, seed=seed, turns=(turns, turns) if turns else (2, TURNS))


def rates(model_dir: Path, adapter: Path | None, eval_dialogs, where: str) -> list[float]:
    """Share of uppercase answers at each turn, greedy, turn by turn (all dialogs as one
    batch per turn); ``where``: the instruction in turn "first", "every" or "none"."""
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.generation.generate import GenerationConfig, batch_generate

    model, tok = load(model_dir, adapter_path=adapter)
    histories = [[] for _ in eval_dialogs]
    hits = [0] * TURNS
    config = GenerationConfig(max_tokens=24, temp=0.0)
    for t in range(TURNS):
        for h, d in zip(histories, eval_dialogs):
            add = (where == "every") or (where == "first" and t == 0)
            h.append({"role": "user", "content": f"{d[t]} {INSTRUCTION}" if add else d[t]})
        outs = batch_generate(model, tok, [tok.encode_chat(h) for h in histories], config)
        for h, o in zip(histories, outs):
            answer = cut_answer(tok.decode(o))[0].strip()
            hits[t] += follows(answer)
            h.append({"role": "assistant", "content": answer})
    return [x / len(eval_dialogs) for x in hits]


def plain_records(model_dir: Path, plain_dialogs, seed: int) -> list[dict]:
    """The mix: ``lora-train`` records of dialogs with no instruction, answered greedily
    by the warm model turn by turn (dialogs of the same length as one batch); every
    answer but the last ``"train": false``, as in the GAtt records."""
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.generation.generate import GenerationConfig, batch_generate

    model, tok = load(model_dir)
    config = GenerationConfig(max_tokens=24, temp=0.0)
    out = []
    for n in sorted({len(d) for d in plain_dialogs}):
        group = [d for d in plain_dialogs if len(d) == n]
        histories = [[] for _ in group]
        for t in range(n):
            for h, d in zip(histories, group):
                h.append({"role": "user", "content": d[t]})
            outs = batch_generate(model, tok, [tok.encode_chat(h) for h in histories], config)
            for h, o in zip(histories, outs):
                reply = {"role": "assistant", "content": cut_answer(tok.decode(o))[0].strip()}
                h.append(reply if t == n - 1 else {**reply, "train": False})
        out += [{"messages": h} for h in histories]
    random.Random(seed).shuffle(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--warmup", type=int, default=800, help="warm-up dialogs")
    p.add_argument("--warmup-iters", type=int, default=300)
    p.add_argument("--dialogs", type=int, default=240, help="GAtt training dialogs")
    p.add_argument("--mix", type=int, default=None,
                   help="dialogs with no instruction mixed into the GAtt data (default: as "
                        "many as --dialogs; 0: GAtt records alone)")
    p.add_argument("--gatt-iters", type=int, default=200)
    p.add_argument("--eval", type=int, default=48, help="held-out 5-turn dialogs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    mix = args.dialogs if args.mix is None else args.mix
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gatt-experiment-"))
    demo = default_model_path()
    tic = time.perf_counter()
    print(f"work folder: {work}", file=sys.stderr)

    # 1. The warm model: follows the instruction when it is in the current turn.
    write_jsonl(work / "warm-data" / "train.jsonl", warmup_records(args.warmup, args.seed))
    llama2("lora-train", "--model", str(demo), "--data", str(work / "warm-data"),
           "--adapter-path", str(work / "warm-adapters"), "--iters", str(args.warmup_iters),
           "--batch-size", "8", "--lr", "1e-3", "--max-seq-length", "256", "--rank", "8",
           "--save-every", "0", "--seed", str(args.seed), "--no-progress")
    warm = work / "warm-model"
    llama2("fuse", "--model", str(demo), "--adapter-path", str(work / "warm-adapters"),
           "--out", str(warm))

    held = dialogs(args.eval, "heldout", args.seed + 1, turns=TURNS)
    before = {w: rates(warm, None, held, w) for w in ("first", "every", "none")}

    # 3. GAtt data from the warm model, then one LoRA fine-tune on it.
    write_jsonl(work / "dialogs.jsonl",
                ({"messages": [{"role": "user", "content": q} for q in d]}
                 for d in dialogs(args.dialogs, "train", args.seed + 2)))
    (work / "instructions.txt").write_text(INSTRUCTION + "\n")
    llama2("gatt", "--model", str(warm), "--dialogs", str(work / "dialogs.jsonl"),
           "--instructions", str(work / "instructions.txt"), "--out", str(work / "gatt"),
           "-k", "1", "--temp", "0", "--max-tokens", "24", "--seed", str(args.seed),
           "--no-progress")
    recs = [json.loads(x) for x in (work / "gatt" / "train.jsonl").read_text().splitlines()]
    last_ok = sum(follows(r["messages"][-1]["content"]) for r in recs) / len(recs)
    data = work / "gatt"
    plain = plain_records(warm, dialogs(mix, "train", args.seed + 3), args.seed) if mix else []
    plain_up = sum(follows(r["messages"][-1]["content"]) for r in plain) / max(len(plain), 1)
    if plain:
        data = work / "gatt-mix"
        mixed = recs + plain
        random.Random(args.seed).shuffle(mixed)
        write_jsonl(data / "train.jsonl", mixed)
    llama2("lora-train", "--model", str(warm), "--data", str(data),
           "--adapter-path", str(work / "gatt-adapters"), "--iters", str(args.gatt_iters),
           "--batch-size", "8", "--lr", "3e-4", "--max-seq-length", "256", "--rank", "8",
           "--save-every", "0", "--seed", str(args.seed), "--no-progress")
    after = {w: rates(warm, work / "gatt-adapters", held, w) for w in ("first", "every", "none")}

    print(f"\nGhost Attention on the demo model: share of answers in uppercase per turn "
          f"({args.eval} held-out {TURNS}-turn dialogs, greedy; instruction {INSTRUCTION!r})")
    print(f"GAtt data: {len(recs)} dialogs, last answer in uppercase in {last_ok:.0%} of them")
    print(f"mixed in: {len(plain)} dialogs with no instruction"
          + (f", last answer in uppercase in {plain_up:.0%} of them" if plain else "") + "\n")
    header = "| instruction | model | " + " | ".join(f"turn {t + 1}" for t in range(TURNS)) + " |"
    print(header)
    print("|" + "---|" * (TURNS + 2))
    names = {"first": "turn 1 only", "every": "every turn", "none": "none (control)"}
    for w in ("first", "every", "none"):
        for label, r in (("before GAtt", before[w]), ("after GAtt", after[w])):
            print(f"| {names[w]} | {label} | " + " | ".join(f"{x:.0%}" for x in r) + " |")
    print(f"\n({time.perf_counter() - tic:.0f}s in all)")


if __name__ == "__main__":
    main()
