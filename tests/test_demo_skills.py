"""The walkthrough's data helpers (llama2_mlx.demo.skills, ``llama2 demo``)."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from cli.app import app
from llama2_mlx.demo import skills as S
from llama2_mlx.demo import tasks as T
from llama2_mlx.errors import Llama2Error

runner = CliRunner()


@pytest.mark.parametrize("name", list(S.SKILLS))
def test_skill_splits_are_disjoint_and_the_checker_recomputes_answers(name):
    skill = S.SKILLS[name]
    train, held = S.skill_split(skill, "train"), S.skill_split(skill, "heldout")
    assert held and not set(train) & set(held)
    assert sorted(train + held) == sorted(skill.items())
    train_q = {e.question for e in S.examples(name, 2000, seed=0)}
    held_ex = S.examples(name, 10_000, seed=0, split="heldout", unique=True)
    assert len(held_ex) == len(held) * len(skill.templates)
    assert not train_q & {e.question for e in held_ex}
    for e in held_ex[:200]:
        assert S.check(name, e.question, f" {e.answer}\n")
        assert not S.check(name, e.question, e.answer + "0")


def test_skills_are_new_to_the_bundled_tasks():
    questions = [e.question for e in S.examples("next", 50, 0) + S.examples("double", 50, 0)]
    for q in questions:
        for task in T.TASKS:
            with pytest.raises(ValueError):
                T.solve(task, q)


def test_checker_examples():
    assert S.solve("next", "What number comes after 19?") == "20"
    assert S.solve("double", "What is twice 45?") == "90"
    assert S.solve("subtract", "Subtract 7 from 30.") == "23"
    assert S.check("add", "What is 2 + 3?", "5")  # bundled tasks go to tasks.check
    with pytest.raises(ValueError):
        S.solve("next", "What number comes before 19?")
    with pytest.raises(Llama2Error, match="unknown skill or task"):
        S.examples("nope", 3, 0)


def test_wrong_answers_are_wrong():
    rng = random.Random(0)
    for name in S.NAMES:
        for e in S.examples(name, 60, seed=1):
            wrong, rating = S.wrong_answer(e, rng)
            assert not S.check(name, e.question, wrong), (e, wrong)
            assert rating in ("better", "significantly_better")


def _solves(task, question):
    try:
        T.solve(task, question)
        return True
    except ValueError:
        return False


def test_written_files_are_what_the_commands_read(tmp_path, tok):
    from llama2_mlx.chat.records import read_prompts
    from llama2_mlx.rlhf.reward_data import load_reward_data
    from llama2_mlx.training.data import load_samples

    assert S.write_skill_data("next", tmp_path / "d", n=20, n_eval=5, replay=0.5) == S.SkillDataWritten(
        {"train.jsonl": 40, "valid.jsonl": 5, "test.jsonl": 5}, replay=20)
    train = [json.loads(x)["messages"][0]["content"] for x in open(tmp_path / "d" / "train.jsonl")]
    kinds = {next((t for t in T.TASKS if _solves(t, q)), "next") for q in train}
    assert kinds == set(T.TASKS) | {"next"}
    for split in ("train", "valid", "test"):
        for s in load_samples(tmp_path / "d" / f"{split}.jsonl", tok):
            assert s.num_targets > 0
    valid = {json.loads(x)["messages"][0]["content"] for x in open(tmp_path / "d" / "valid.jsonl")}
    test = {json.loads(x)["messages"][0]["content"] for x in open(tmp_path / "d" / "test.jsonl")}
    assert not valid & test

    assert S.write_pairs(tmp_path / "p", ("add", "spell", "next"), n=10, n_valid=4) == S.PairsWritten(
        {"train.jsonl": 30, "valid.jsonl": 12}, from_model=0)
    train, held = load_reward_data(tmp_path / "p")
    assert len(train) == 30 and len(held) == 12
    assert {p.rating for p in train} <= {"better", "significantly_better"}

    assert S.write_prompts(tmp_path / "q.jsonl", ["reverse", "next"], n=4) == 8
    prompts = read_prompts(tmp_path / "q.jsonl")
    assert len(prompts) == 8 and prompts[0][-1]["role"] == "user"


def test_pairs_take_the_models_own_mistakes(tmp_path, tok, model_dir):
    from conftest import make_model

    model = make_model()  # random weights: wrong about everything
    exs = S.examples("next", 5, seed=0)
    own = S.sampled_wrong_answers(model, tok, exs, k=2, max_tokens=4)
    assert len(own) == 5
    for e, w in zip(exs, own):
        assert w is None or not S.check("next", e.question, w)
    counts = S.write_pairs(tmp_path, ["next"], n=4, n_valid=2, model=model_dir, k=2)
    recs = [json.loads(x) for x in open(tmp_path / "train.jsonl")]
    assert counts.from_model == sum(r["source"] == "model" for r in recs) + sum(
        json.loads(x)["source"] == "model" for x in open(tmp_path / "valid.jsonl"))
    for r in recs:
        assert not S.check("next", r["prompt"], r["rejected"]) and r["rejected"].strip()
    # Where every sample is right, the wrong answer is made up.
    recs = S.pair_records(["next"], 3, 0, "train", sampler=lambda exs, split: [None] * len(exs))
    assert {r["source"] for r in recs} == {"made up"}


def test_check_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "What number comes after 9?"},
                      {"role": "assistant", "content": "10"}]},
        {"messages": [{"role": "user", "content": "Spell the word cat."},
                      {"role": "assistant", "content": "c a"}]},
        {"prompt": "What is 2 + 2?", "response": " 4"},
    ]) + "\n")
    assert S.check_file(path) == {"next": (1, 1), "spell": (0, 1), "add": (1, 1)}
    path.write_text(json.dumps({"prompt": "Who are you?", "response": "x"}) + "\n")
    with pytest.raises(Llama2Error, match="no checker"):
        S.check_file(path)


def test_demo_commands(tmp_path, model_dir, monkeypatch):
    from llama2_mlx import demo

    monkeypatch.setattr(demo, "default_model_path", lambda: model_dir)
    r = runner.invoke(app, ["demo", "path"])
    assert r.exit_code == 0 and r.stdout.strip() == str(model_dir)
    # What a command wrote is a message (stderr), with the absolute path.
    r = runner.invoke(app, ["demo", "data", "--skill", "double", "--out", str(tmp_path / "d"),
                            "--n", "8", "--n-eval", "2", "--replay", "0.2"])
    assert r.exit_code == 0 and "train.jsonl (10)" in r.stderr and r.stdout == "", r.stderr
    assert f"to {(tmp_path / 'd').resolve()} " in r.stderr
    assert "8 double, 2 bundled-task replay" in r.stderr and "note" not in r.stderr
    r = runner.invoke(app, ["demo", "pairs", "--out", str(tmp_path / "p"), "--tasks", "add,next",
                            "--n", "3", "--n-valid", "1"])
    assert r.exit_code == 0 and "train.jsonl (6 pairs)" in r.stderr, r.stderr
    assert "0 rejected answers are the model's own, 8 made up" in r.stderr
    r = runner.invoke(app, ["demo", "pairs", "--out", str(tmp_path / "p2"), "--tasks", "next",
                            "--n", "2", "--n-valid", "1", "--model", str(model_dir), "-k", "2"])
    assert r.exit_code == 0 and "train.jsonl (2 pairs)" in r.stderr, r.stderr
    r = runner.invoke(app, ["demo", "check", "--data", str(tmp_path / "d" / "train.jsonl")])
    assert r.exit_code == 0 and "double: accuracy 1.000 (8/8)" in r.stdout, r.stderr
    r = runner.invoke(app, ["demo", "prompts", "--out", str(tmp_path / "q.jsonl"), "--n", "2"])
    assert r.exit_code == 0 and f"wrote {2 * len(T.TASKS)} prompts" in r.stderr, r.stderr
    r = runner.invoke(app, ["demo", "eval", "--skill", "next", "--n", "4", "--show", "1"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("next (heldout): accuracy 0.") and "wrong (want '65')" in r.stderr
    r = runner.invoke(app, ["demo", "eval", "--skill", "next", "--task", "add"])
    assert r.exit_code == 2 and r.stderr.strip() == "error: give one of --skill or --task"
    r = runner.invoke(app, ["demo", "data", "--skill", "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown skill or task 'nope'" in r.stderr


def test_fewer_held_out_records_than_asked_say_why(tmp_path):
    # next holds out 20 numbers in 3 phrasings: 60 questions, 30 each for valid and test.
    r = runner.invoke(app, ["demo", "data", "--skill", "next", "--out", str(tmp_path / "d"),
                            "--n", "4", "--n-eval", "100"])
    assert r.exit_code == 0, r.stderr
    assert "valid.jsonl (30), test.jsonl (30)" in r.stderr
    assert ("note: --n-eval 100: next has 60 distinct held-out questions, and valid.jsonl and "
            "test.jsonl share none, so each has 30") in r.stderr
    r = runner.invoke(app, ["demo", "pairs", "--out", str(tmp_path / "p"), "--tasks", "next",
                            "--n", "2", "--n-valid", "100"])
    assert r.exit_code == 0, r.stderr
    assert ("note: --n-valid 100: next has 60 distinct held-out questions, so valid.jsonl has "
            "60 of its pairs") in r.stderr


def test_demo_pairs_with_a_model_shows_progress(tmp_path, model_dir):
    args = ["demo", "pairs", "--out", str(tmp_path / "p"), "--tasks", "next,add", "--n", "4",
            "--n-valid", "2", "--model", str(model_dir), "-k", "2"]
    r = runner.invoke(app, args)  # stderr is no terminal here: progress lines
    assert r.exit_code == 0, r.stderr
    for line in ("sampling next (train) 4/4", "sampling add (heldout) 2/2"):
        assert line in r.stderr, r.stderr
    r = runner.invoke(app, args + ["--no-progress"])
    assert r.exit_code == 0 and "sampling" not in r.stderr, r.stderr


def test_safety_prompts_and_gatt_dialogs(tmp_path):
    from llama2_mlx.demo import dialogs as D
    from llama2_mlx.chat.records import read_flagged_prompts
    from llama2_mlx.rlhf.gatt import read_dialogs, read_instructions

    # Prompts of the --safety-tasks say "safety": true, which the RLHF commands read.
    r = runner.invoke(app, ["demo", "prompts", "--out", str(tmp_path / "q.jsonl"), "--n", "3",
                            "--tasks", "count,capital", "--safety-tasks", "capital"])
    assert r.exit_code == 0 and 'wrote 6 prompts' in r.stderr and "capital marked" in r.stderr
    records = [json.loads(x) for x in open(tmp_path / "q.jsonl")]
    assert [x.get("safety", False) for x in records] == [False] * 3 + [True] * 3
    assert {x["task"] for x in records if x.get("safety")} == {"capital"}
    prompts, flags = read_flagged_prompts(tmp_path / "q.jsonl")
    assert len(prompts) == 6 and list(flags) == [False] * 3 + [True] * 3
    r = runner.invoke(app, ["demo", "prompts", "--out", str(tmp_path / "x.jsonl"),
                            "--tasks", "count", "--safety-tasks", "capital"])
    assert r.exit_code == 2 and r.stderr.startswith("error: --safety-tasks must name"), r.stderr

    # Dialogs: distinct questions of the tasks, 2-5 user turns; deterministic in the seed.
    ds = D.dialogs(n=40, seed=3)
    assert ds == D.dialogs(n=40, seed=3) and ds != D.dialogs(n=40, seed=4)
    assert {len(d) for d in ds} == {2, 3, 4, 5}
    assert all(len(set(d)) == len(d) for d in ds)
    assert {S.task_of(q) for d in ds for q in d} == set(D.DIALOG_NAMES)
    held = D.dialogs(["spell"], 5, split="heldout", turns=(3, 3))
    train_q = {e.question for e in S.examples("spell", 10**4, 0, "train")}
    assert all(len(d) == 3 and not set(d) & train_q for d in held)
    assert D.parse_turns("2-5") == (2, 5) and D.parse_turns("3") == (3, 3)
    for bad in ("0", "5-2", "x"):
        with pytest.raises(Llama2Error, match="turns"):
            D.parse_turns(bad)

    # The command writes what gatt reads.
    r = runner.invoke(app, ["demo", "dialogs", "--out", str(tmp_path / "d.jsonl"), "--n", "4",
                            "--turns", "2-3", "--instructions-out", str(tmp_path / "i.txt")])
    assert r.exit_code == 0 and "wrote 4 dialogs" in r.stderr, r.stderr
    dialogs = read_dialogs(tmp_path / "d.jsonl")
    assert len(dialogs) == 4 and all(2 <= len(d.users) <= 3 for d in dialogs)
    assert read_instructions(tmp_path / "i.txt") == list(D.INSTRUCTIONS)
    r = runner.invoke(app, ["demo", "dialogs", "--out", str(tmp_path / "e.jsonl"), "--turns", "5-2"])
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: --turns must be"), r.stderr
