"""Long jobs speak and show their curves: metrics.jsonl (written as a run goes, resumed
runs without duplicates), progress lines off a terminal, --no-progress, llama2 plot, and
the notes of lora-train / reward-train (no valid.jsonl, rows longer than the context)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from test_reward import write_pairs
from test_trainer import task_file
from typer.testing import CliRunner

from cli.app import app
from llama2_mlx.training.metrics import MetricsLog, read_metrics

runner = CliRunner()


def records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_metrics_log_resumes_without_duplicates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.restart()
    for step in range(1, 5):
        log.write("train", step, train_loss=1.0 / step, lr=None)
    log.write("val", 2, val_loss=0.5)
    log.write("val", 2, val_loss=0.5)  # the same record again: not written twice
    assert [(r["kind"], r["step"]) for r in records(path)] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("val", 2)]
    assert "lr" not in records(path)[0]  # None values are left out
    # A run resumed at step 2 drops what came after it, then writes it again.
    log = MetricsLog(path)
    log.restart(2)
    assert [r["step"] for r in records(path)] == [1, 2, 2]
    log.write("train", 3, train_loss=0.3)
    assert [r["step"] for r in records(path)] == [1, 2, 2, 3]
    # rs-loop's fine-tunes: each iteration's records are its own.
    loop = MetricsLog(tmp_path / "loop.jsonl")
    loop.restart(key="iteration")
    for it in (1, 2):
        ft = loop.scoped(iteration=it)
        ft.restart()
        ft.write("train", 1, train_loss=float(it))
        ft.write("train", 2, train_loss=float(it))
        if it == 2:
            ft.restart(1)  # iteration 2's fine-tune resumed at its step 1
        loop.write("iteration", it, iteration=it, mean_greedy_reward=0.1 * it)
    assert [(r["kind"], r["iteration"], r["step"]) for r in records(tmp_path / "loop.jsonl")] == [
        ("train", 1, 1), ("train", 1, 2), ("iteration", 1, 1), ("train", 2, 1), ("iteration", 2, 2)]
    loop.restart(1, key="iteration")  # the loop resumed after iteration 1
    assert [(r["kind"], r["iteration"]) for r in records(tmp_path / "loop.jsonl")] == [
        ("train", 1), ("train", 1), ("iteration", 1)]
    (tmp_path / "cut.jsonl").write_text('{"step": 1}\n{"step": 2, "tr')  # a crash mid-line
    assert read_metrics(tmp_path / "cut.jsonl") == [{"step": 1}]


@pytest.fixture
def sft_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    task_file(data / "train.jsonl", 16, 0)
    task_file(data / "valid.jsonl", 4, 1)
    return data


def lora_train(model_dir, data, ad, *extra):
    return runner.invoke(app, [
        "lora-train", "--model", str(model_dir), "--data", str(data), "--adapter-path", str(ad),
        "--max-seq-length", "64", "--batch-size", "2", "--iters", "4", "--save-every", "2",
        "--val-every", "2", "--lr", "1e-3", *extra])


def test_lora_train_writes_metrics_and_logs_progress_lines(tmp_path, model_dir, sft_data):
    ad = tmp_path / "ad"
    r = lora_train(model_dir, sft_data, ad, "--log-every", "2")
    assert r.exit_code == 0, r.output
    recs = records(ad / "metrics.jsonl")
    train = [x for x in recs if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    assert {"train_loss", "lr", "tokens_per_sec", "peak_memory_gb"} <= set(train[0])
    assert [x["step"] for x in recs if x["kind"] == "val"] == [0, 2, 4]
    # stderr is no terminal here: a line every --log-every steps instead of a bar
    lines = [x for x in r.stderr.splitlines() if x.startswith("lora-train ")]
    assert [x.split(":")[0] for x in lines] == ["lora-train 2/4", "lora-train 4/4"]
    assert all(" tok/s, peak " in x and "loss " in x and "lr " in x for x in lines), lines
    first = records(ad / "metrics.jsonl")
    # the results on stdout, the messages on stderr
    val = [x for x in recs if x["kind"] == "val"][-1]["val_loss"]
    assert r.stdout == f"val loss {val:.4f} (step 4)\n"

    # Resumed from step 2 (the step-4 checkpoint lost): the same records, none twice, and
    # the steps after 2 are the resumed run's (a stale record of the lost steps is dropped).
    shutil.rmtree(ad / "checkpoints" / "step_0000004")
    stale = [dict(x, train_loss=99.0) if (x["kind"], x["step"]) == ("train", 3) else x
             for x in first]
    (ad / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stale))
    r = lora_train(model_dir, sft_data, ad, "--resume", "--steps-per-report", "1")
    assert r.exit_code == 0, r.output
    again = records(ad / "metrics.jsonl")
    assert [(x["kind"], x["step"]) for x in again] == [(x["kind"], x["step"]) for x in first]
    for x, y in zip(first, again):
        for key in ("train_loss", "val_loss", "lr"):
            assert x.get(key) == pytest.approx(y.get(key), abs=1e-5)
    assert [x.split(":")[0] for x in r.stderr.splitlines() if x.startswith("lora-train ")] == [
        "lora-train 3/4", "lora-train 4/4"]

    # --no-progress: no bar and no lines (the validation lines stay)
    r = lora_train(model_dir, sft_data, tmp_path / "quiet", "--no-progress")
    assert r.exit_code == 0, r.output
    assert not any(x.startswith("lora-train ") for x in r.stderr.splitlines())
    assert "step 2: val loss" in r.stderr


def test_lora_train_notes_no_validation_and_caps_rows_at_the_context(tmp_path, model_dir,
                                                                      sft_data):
    (sft_data / "valid.jsonl").unlink()
    ad = tmp_path / "ad"
    r = runner.invoke(app, [
        "lora-train", "--model", str(model_dir), "--data", str(sft_data), "--adapter-path",
        str(ad), "--iters", "1", "--batch-size", "2", "--max-seq-length", "1000",
        "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (f"no valid.jsonl in {sft_data.resolve()}: training without validation"
            in r.stderr)
    # the tiny model's context is 256 tokens (conftest.TINY)
    assert ("--max-seq-length 1000 is above the model's context of 256 tokens: rows of 256 "
            "tokens are used") in r.stderr
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["training"]["max_seq_length"] == 256
    assert f"adapters written to {ad.resolve()}" in r.stderr


def test_reward_train_metrics_aliases_and_notes(tmp_path, model_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_pairs(data / "train.jsonl", 24)
    out = tmp_path / "rm"
    r = runner.invoke(app, [
        "reward-train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--iters", "4", "--batch-size", "4", "--rank", "2", "--learning-rate", "1e-3",
        "--eval-every", "2", "--max-seq-len", "1000", "--no-progress"])
    assert r.exit_code == 0, r.output
    # the old names are hidden aliases, and messages name the option as typed
    assert "--max-seq-len 1000 is above the model's context of 256 tokens" in r.stderr
    assert f"no valid.jsonl in {data.resolve()}: 1 of its 24 pairs are held out" in r.stderr
    val = [x for x in records(out / "metrics.jsonl") if x["kind"] == "val"]
    assert [x["step"] for x in val] == [2, 4]
    assert {"val_loss", "val_accuracy", "val_gap"} <= set(val[0])
    assert [x["step"] for x in records(out / "metrics.jsonl") if x["kind"] == "train"] == [1, 2, 3, 4]
    assert f"reward model written to {out.resolve()}" in r.stderr
    # the new names, shown in help
    r = runner.invoke(app, ["reward-train", "--help"], env={"COLUMNS": "200"})
    assert "--max-seq-length" in r.stdout and "--val-every" in r.stdout
    assert "--max-seq-len " not in r.stdout and "--eval-every" not in r.stdout


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_the_curves_of_a_real_run(tmp_path, model_dir, sft_data):
    pytest.importorskip("matplotlib")
    ad = tmp_path / "ad"
    assert lora_train(model_dir, sft_data, ad, "--no-progress").exit_code == 0
    r = runner.invoke(app, ["plot", str(ad)])
    assert r.exit_code == 0, r.output
    png = ad / "loss.png"
    assert is_png(png) and png.stat().st_size > 10_000
    assert r.stderr == f"plot written to {png.resolve()}\n"
    r = runner.invoke(app, ["plot", str(ad / "metrics.jsonl"), "--out", str(tmp_path / "c.svg")])
    assert r.exit_code == 0 and (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    r = runner.invoke(app, ["plot", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "metrics.jsonl" in r.stderr


def test_plot_without_matplotlib_is_one_error_line(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "train_loss": 1.0}\n')
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    r = runner.invoke(app, ["plot", str(tmp_path)])
    assert r.exit_code == 2
    assert r.stderr == "error: llama2 plot needs matplotlib: pip install 'llama2-mlx[plot]'\n"
