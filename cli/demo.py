"""``llama2 demo``: data, prompts and scoring for the walkthrough (docs/walkthrough.md)
with the bundled demo model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import add_command, cli_errors, eprint
from cli.options import AdapterOpt, DemoModelOpt, NoProgressOpt

demo_app = typer.Typer(
    help="The walkthrough's helpers for the bundled demo model: new-skill data, preference "
         "pairs, prompts, GAtt dialogs and greedy accuracy.",
    no_args_is_help=True,
)

_SKILLS = "next, double or subtract"
_TASKS = "add, count, spell, reverse, convert or capital"
OutDir = Annotated[str, typer.Option("--out", "-o", help="Output folder.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed (which questions are drawn).")]
NamesOpt = Annotated[Optional[str], typer.Option(
    "--tasks", help=f"Comma-separated bundled tasks ({_TASKS}) and/or new skills ({_SKILLS}).")]


def _names(names: Optional[str], default: tuple[str, ...]) -> list[str]:
    return [x.strip() for x in names.split(",") if x.strip()] if names else list(default)


@cli_errors
def path() -> None:
    """Print the bundled demo model's folder (for --model where a command needs one)."""
    from llama2_mlx import demo

    typer.echo(str(demo.default_model_path()))


@cli_errors
def data(
    skill: Annotated[str, typer.Option(help=f"New skill: {_SKILLS} (or a bundled task).")],
    out: OutDir,
    n: Annotated[int, typer.Option(help="Training examples of the skill (train.jsonl).")] = 400,
    n_eval: Annotated[int, typer.Option(help="Held-out examples in each of valid.jsonl and test.jsonl.")] = 40,
    replay: Annotated[float, typer.Option(help="Share of train.jsonl taken from the bundled tasks, so that they are not forgotten.")] = 0.5,
    seed: SeedOpt = 0,
) -> None:
    """Write lora-train data (train/valid/test.jsonl, Llama 2 chat messages) for a skill."""
    from llama2_mlx.demo.skills import write_skill_data

    w = write_skill_data(skill, out, n=n, n_eval=n_eval, replay=replay, seed=seed)
    eprint(f"wrote {', '.join(f'{f} ({c})' for f, c in w.records.items())} to "
           f"{Path(out).resolve()} (train.jsonl: {w.records['train.jsonl'] - w.replay} {skill}, "
           f"{w.replay} bundled-task replay)")
    if w.note:
        eprint("note:", w.note)


@cli_errors
def pairs(
    out: OutDir, tasks: NamesOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Take the wrong answers from this model's own samples where it has some (default: made-up ones only).")] = None,
    k: Annotated[int, typer.Option("-k", help="Samples per question with --model.")] = 4,
    n: Annotated[int, typer.Option(help="Training pairs per task (train.jsonl).")] = 100,
    n_valid: Annotated[int, typer.Option(help="Held-out pairs per task (valid.jsonl).")] = 20,
    seed: SeedOpt = 0, no_progress: NoProgressOpt = False,
) -> None:
    """Write reward-train pairs: the right answer (chosen) against a wrong one (rejected)."""
    from llama2_mlx.demo.skills import DEFAULT_PAIR_NAMES, write_pairs

    w = write_pairs(out, _names(tasks, DEFAULT_PAIR_NAMES), n=n, n_valid=n_valid,
                    seed=seed, model=model, k=k, progress=not no_progress)
    eprint(f"wrote {', '.join(f'{f} ({c} pairs)' for f, c in w.pairs.items())} to "
           f"{Path(out).resolve()}; {w.from_model} rejected answers are the model's own, "
           f"{w.made_up} made up")
    for note in w.notes:
        eprint("note:", note)


@cli_errors
def prompts(
    out: Annotated[str, typer.Option("--out", "-o", help="Output JSONL file.")],
    tasks: NamesOpt = None,
    n: Annotated[int, typer.Option(help="Distinct questions per task.")] = 32,
    split: Annotated[str, typer.Option(help="Question split: heldout or train.")] = "heldout",
    safety_tasks: Annotated[Optional[str], typer.Option(
        help="Comma-separated tasks of --tasks whose prompts say \"safety\": true (a stand-in "
             "for safety prompts: the gate scores them with the safety reward model).")] = None,
    seed: SeedOpt = 0,
) -> None:
    """Write prompts (JSONL) for rejection-sample, rs-loop and ppo."""
    from llama2_mlx.demo.skills import write_prompts
    from llama2_mlx.demo.tasks import TASKS

    safety = _names(safety_tasks, ())
    count = write_prompts(out, _names(tasks, TASKS), n=n, seed=seed, split=split,
                          safety_tasks=safety)
    flagged = f" ({', '.join(safety)} marked \"safety\": true)" if safety else ""
    eprint(f"wrote {count} prompts to {Path(out).resolve()}{flagged}")


@cli_errors
def dialogs(
    out: Annotated[str, typer.Option("--out", "-o", help="Output JSONL file (gatt --dialogs).")],
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", help=f"Comma-separated bundled tasks ({_TASKS}) and/or new skills "
                        f"({_SKILLS}); default spell, reverse, capital.")] = None,
    n: Annotated[int, typer.Option(help="Dialogs.")] = 64,
    turns: Annotated[str, typer.Option(help="User turns per dialog: N or LO-HI (uniform).")] = "2-5",
    split: Annotated[str, typer.Option(help="Question split: train or heldout.")] = "train",
    instructions_out: Annotated[Optional[str], typer.Option(
        help="Also write the demo's instructions (\"Answer in uppercase.\"), one a line, to this "
             "file (gatt --instructions).")] = None,
    seed: SeedOpt = 0,
) -> None:
    """Write multi-turn dialogs (user turns only) of the demo tasks' questions for gatt."""
    from llama2_mlx.demo.dialogs import DIALOG_NAMES, parse_turns, write_dialogs

    count = write_dialogs(out, _names(tasks, DIALOG_NAMES), n, split=split, seed=seed,
                          turns=parse_turns(turns), instructions_out=instructions_out)
    eprint(f"wrote {n} dialogs ({count} user turns) to {Path(out).resolve()}"
           + (f"; instructions to {Path(instructions_out).resolve()}" if instructions_out else ""))


@cli_errors
def eval_(
    model: DemoModelOpt = None, adapter_path: AdapterOpt = None,
    skill: Annotated[Optional[str], typer.Option(help=f"New skill to score: {_SKILLS}.")] = None,
    task: Annotated[Optional[str], typer.Option(help=f"Bundled task to score: {_TASKS}.")] = None,
    n: Annotated[int, typer.Option(help="Distinct questions.")] = 64,
    split: Annotated[str, typer.Option(help="Question split: heldout or train.")] = "heldout",
    show: Annotated[int, typer.Option(help="Answers to print.")] = 3,
    seed: SeedOpt = 0,
) -> None:
    """Greedy accuracy on (held-out) questions, checked automatically (exact match)."""
    from llama2_mlx.demo.skills import evaluate_model
    from llama2_mlx.errors import Llama2Error

    if (skill is None) == (task is None):
        raise Llama2Error("give one of --skill or --task")
    result = evaluate_model(model, skill or task, adapter_path=adapter_path, n=n, seed=seed,
                            split=split)
    for question, answer, output, ok in result.rows[:show]:
        eprint(f"{question} -> {output.strip()!r} " + ("right" if ok else f"wrong (want {answer!r})"))
    typer.echo(result.summary())


@cli_errors
def check(
    data: Annotated[str, typer.Option(help="JSONL of answers: dialogs ending with the answer (lora-train data, rejection-sample winners) or prompt + response.")],
) -> None:
    """Check the answers of a JSONL file with the automatic checkers (accuracy per task)."""
    from llama2_mlx.demo.skills import check_file

    for name, (right, n) in check_file(data).items():
        typer.echo(f"{name}: accuracy {right / n:.3f} ({right}/{n})")


def register(app: typer.Typer) -> None:
    for name, fn in (("path", path), ("data", data), ("pairs", pairs), ("prompts", prompts),
                     ("dialogs", dialogs), ("eval", eval_), ("check", check)):
        add_command(demo_app, name, fn)
    app.add_typer(demo_app, name="demo")
