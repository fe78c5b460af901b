"""Outputs and lost work (issue 10, classes 5-7): output folders locked against a second
run (a dead holder's lock is stale), checked before any work (read-only, a file in the
way), a full disk ending in one line with the earlier run whole, files that belong
together landing together, non-finite weights never written, a resumed run falling
back to the newest intact checkpoint.

The read-only folder and the full disk are real: a tmpfs mounted by the test (read-only,
or a few hundred KB filled to the brim), where the machine lets the test mount one
(root); elsewhere those tests are skipped. The writes go through the real write path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

import hostile as H
from cli.app import app
from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.atomic import atomic_files, check_finite, save_weights
from llama2_mlx.io.outdir import ASIDE, LOCK_FILE, claim_output

runner = CliRunner()


def data_dir(tmp_path: Path, n: int = 8) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    words = ["red", "blue", "green", "gold", "gray", "pink", "black", "white"]
    with open(d / "train.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"say {words[i % 8]}", "completion": words[i % 8]}) + "\n")
    return d


def train_args(model_dir, data, ad, iters: int = 4, *extra) -> list[str]:
    return ["lora-train", "--model", str(model_dir), "--data", str(data), "--adapter-path",
            str(ad), "--iters", str(iters), "--save-every", "2", "--val-every", "0",
            "--batch-size", "2", "--max-seq-length", "32", "--rank", "2", "--no-progress",
            *extra]


def files(folder: Path) -> dict:
    """Every file under ``folder`` (but the lock) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


# --------------------------------------------------------------------------- mounts


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")


@pytest.fixture
def tmpfs(tmp_path):
    """A function mounting a small tmpfs (unmounted at the end)."""
    mounted: list[Path] = []
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")

    def mount(name: str, size: str = "1m", readonly: bool = False) -> Path:
        p = tmp_path / name
        _mount_tmpfs(p, size, readonly)
        mounted.append(p)
        return p

    yield mount
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill the file system of ``disk`` up to ``leave`` bytes free."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    os.sync()


# --------------------------------------------------------------------------- locks


def test_a_second_run_on_an_output_folder_is_refused_naming_the_holder(tmp_path, model_dir):
    """A real lora-train run holds its folder; a second one is refused at once (before
    loading anything) naming the first one's pid; once the first is killed with -9 its
    lock is stale, and the next run takes it over, says so, and finishes."""
    data, ad = data_dir(tmp_path), tmp_path / "ad"
    env = {**os.environ, "PYTHONPATH": str(H.ROOT), "HF_HUB_OFFLINE": "1"}
    holder = subprocess.Popen([sys.executable, "-m", "cli.app",
                               *train_args(model_dir, data, ad, 100000)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((ad / "checkpoints").glob("step_*")):
            assert holder.poll() is None, holder.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.2)
        second = H.run_cli(*train_args(model_dir, data, ad, 4, "--overwrite"), cwd=tmp_path)
        H.assert_one_line_error(second, "--adapter-path", "is in use by another run",
                                f"pid {holder.pid}", "lora-train")
        assert "LoRA:" not in second.stderr  # refused before the model was loaded
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    third = H.run_cli(*train_args(model_dir, data, ad, 4, "--overwrite"), cwd=tmp_path)
    assert third.returncode == 0, third
    assert f"locked by a run that did not end cleanly (pid {holder.pid}" in third.stderr
    assert json.loads((ad / "adapter_config.json").read_text())["step"] == 4


def test_two_claims_of_one_folder_and_the_restore_after_a_killed_replacement(tmp_path):
    out = tmp_path / "out"
    with claim_output(out, field="out", artefacts=["a.txt"]):
        with pytest.raises(Llama2Error, match="is in use by another run"):
            with claim_output(out, field="out", artefacts=["a.txt"]):
                pass
    (out / "a.txt").write_text("finished run")
    said: list[str] = []
    with pytest.raises(Llama2Error, match=r"holds an earlier run's results \(a.txt\)"):
        with claim_output(out, field="out", artefacts=["a.txt"], continues="{resume}"):
            pass
    # A replacing run killed before its first checkpoint leaves the earlier run aside...
    (out / ASIDE).mkdir()
    os.rename(out / "a.txt", out / ASIDE / "a.txt")
    (out / "a.txt").write_text("half of a new run")
    # ... and the next claim puts it back.
    with claim_output(out, field="out", artefacts=["a.txt"], resume=True, say=said.append):
        assert (out / "a.txt").read_text() == "finished run" and not (out / ASIDE).exists()
    assert any("restored the earlier run" in s for s in said)
    # A replacement that fails before its commit puts the earlier run back too.
    with pytest.raises(RuntimeError):
        with claim_output(out, field="out", artefacts=["a.txt"], overwrite=True):
            assert not (out / "a.txt").exists()
            (out / "a.txt").write_text("new")
            raise RuntimeError("the new run failed")
    assert (out / "a.txt").read_text() == "finished run"
    with claim_output(out, field="out", artefacts=["a.txt"], overwrite=True) as claim:
        (out / "a.txt").write_text("new")
        claim.commit()
    assert (out / "a.txt").read_text() == "new" and not (out / ASIDE).exists()


# --------------------------------------------------------------------------- outputs


def test_output_paths_are_checked_before_any_work(tmp_path, model_dir, tmpfs):
    data = data_dir(tmp_path)
    ro = tmpfs("ro", readonly=True)
    ended = H.run_cli(*train_args(model_dir, data, ro / "ad"), cwd=tmp_path)
    line = H.assert_one_line_error(ended, "--adapter-path", "Read-only file system")
    assert "LoRA:" not in ended.stderr and str(ro / "ad") in line
    (tmp_path / "a-file").write_text("not a folder")
    ended = H.run_cli(*train_args(model_dir, data, tmp_path / "a-file"), cwd=tmp_path)
    H.assert_one_line_error(ended, "--adapter-path", "exists and is not a folder")
    assert (tmp_path / "a-file").read_text() == "not a folder"
    ended = H.run_cli("fuse", "--model", str(model_dir), "--adapter-path", str(tmp_path / "x"),
                      "--out", str(ro / "fused"), cwd=tmp_path)
    H.assert_one_line_error(ended, "--out", "Read-only file system")


def test_a_full_disk_is_one_line_and_the_earlier_run_stays_whole(tmp_path, model_dir, tmpfs):
    """A finished run on a small tmpfs; the disk filled; a run replacing it (--overwrite)
    fails at its first write with one line naming the file, and the finished run is
    there, byte for byte, with no temporary left behind."""
    data, disk = data_dir(tmp_path), tmpfs("disk", size="2m")
    ad = disk / "ad"
    first = H.run_cli(*train_args(model_dir, data, ad), cwd=tmp_path)
    assert first.returncode == 0, first
    before = files(ad)
    fill(disk, leave=8 << 10)
    ended = H.run_cli(*train_args(model_dir, data, ad, 4, "--overwrite"), cwd=tmp_path)
    line = H.assert_one_line_error(ended, str(ad), "cannot write")
    assert "space" in line.lower(), line
    assert files(ad) == before
    assert not [p for p in ad.rglob("*") if p.name.startswith(".") and p.name != LOCK_FILE]


def test_files_that_belong_together_land_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "adapters.safetensors", tmp_path / "adapter_config.json"
    a.write_bytes(b"old weights")
    b.write_text("old config")
    with pytest.raises(Llama2Error, match=f"{tmp_path}: cannot write .Input/output error"):
        with atomic_files(a, b) as (ta, tb):
            save_weights(ta, {"w": mx.ones((4,))})
            raise OSError(5, "Input/output error")  # the second file fails
    assert a.read_bytes() == b"old weights" and b.read_text() == "old config"
    assert sorted(p.name for p in tmp_path.iterdir()) == [b.name, a.name]
    with atomic_files(a, b) as (ta, tb):
        save_weights(ta, {"w": mx.ones((4,))})
        Path(tb).write_text("new config")
    assert b.read_text() == "new config" and np.array(mx.load(str(a))["w"]).tolist() == [1] * 4


def test_non_finite_weights_are_never_written(tmp_path, model_dir):
    with pytest.raises(Llama2Error, match=r"w.safetensors: not written: b holds NaN"):
        save_weights(tmp_path / "w.safetensors", {"a": mx.ones((2,)), "b": mx.array([1.0, np.nan])})
    assert not (tmp_path / "w.safetensors").exists()
    check_finite({"ids": mx.array([1, 2], mx.int32)}, "x")  # integers are not checked
    # A fused model of NaN adapters: one line, nothing written.
    data, ad = data_dir(tmp_path), tmp_path / "ad"
    assert runner.invoke(app, train_args(model_dir, data, ad, 2)).exit_code == 0
    w = mx.load(str(ad / "adapters.safetensors"))
    mx.save_safetensors(str(ad / "adapters.safetensors"),
                        {k: v * np.nan if k.endswith("lora_b") else v for k, v in w.items()})
    r = runner.invoke(app, ["fuse", "--model", str(model_dir), "--adapter-path", str(ad),
                            "--out", str(tmp_path / "fused")])
    assert r.exit_code == 2 and "holds NaN or infinite values" in r.output, r.output
    assert not (tmp_path / "fused" / "config.json").exists()


def test_fuse_never_replaces_a_model_without_overwrite_nor_its_own_base(tmp_path, model_dir):
    data, ad = data_dir(tmp_path), tmp_path / "ad"
    assert runner.invoke(app, train_args(model_dir, data, ad, 2)).exit_code == 0
    fused = tmp_path / "fused"
    args = ["fuse", "--model", str(model_dir), "--adapter-path", str(ad), "--out", str(fused)]
    assert runner.invoke(app, args).exit_code == 0
    before = files(fused)
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite replaces it" in r.output and files(fused) == before
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0
    assert files(fused) == before  # the same fuse, written again
    r = runner.invoke(app, ["fuse", "--model", str(model_dir), "--adapter-path", str(ad),
                            "--out", str(model_dir), "--overwrite"])
    assert r.exit_code == 2 and "is the base model's folder" in r.output


# --------------------------------------------------------------------------- resume


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, model_dir):
    """Checkpoints at steps 2 and 4 of a finished run; step 4's weights cut short: --resume
    says so, resumes from step 2 and ends with the uninterrupted run's adapters."""
    data = data_dir(tmp_path)
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    for ad in (straight, damaged):
        r = runner.invoke(app, train_args(model_dir, data, ad) + ["--save-every", "2"])
        assert r.exit_code == 0, r.output
    params = damaged / "checkpoints" / "step_0000004" / "params.safetensors"
    params.write_bytes(params.read_bytes()[:-100])
    (damaged / "adapters.safetensors").unlink()
    r = runner.invoke(app, train_args(model_dir, data, damaged) + ["--resume"])
    assert r.exit_code == 0, r.output
    assert "step_0000004 is damaged" in r.output and "resuming from" in r.output
    assert (damaged / "adapters.safetensors").read_bytes() == \
        (straight / "adapters.safetensors").read_bytes()


@pytest.mark.parametrize("damage", ["no fingerprint", "a list", "bad pairs", "every one"])
def test_a_bad_state_json_is_one_line(tmp_path, model_dir, damage):
    data, ad = data_dir(tmp_path), tmp_path / "ad"
    assert runner.invoke(app, train_args(model_dir, data, ad)).exit_code == 0
    for state_file in sorted((ad / "checkpoints").glob("step_*/state.json")):
        state = json.loads(state_file.read_text())
        if damage == "no fingerprint":
            del state["fingerprint"]
        elif damage == "a list":
            state = [state]
        elif damage == "bad pairs":
            state["train_losses"] = [[1, "x"]]
        else:
            state["files"]["params.safetensors"] += 1
        state_file.write_text(json.dumps(state))
    r = runner.invoke(app, train_args(model_dir, data, ad) + ["--resume"])
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1, r.output
    assert "no intact checkpoint" in errors[0] and "Traceback" not in r.output


# --------------------------------------------------------------------------- long names

LONG = "x" * 5000


@pytest.mark.parametrize("args", [
    ["lora-train", "--model", "m", "--train", LONG],
    ["lora-train", "--model", "m", "--train", "t.jsonl", "--adapter-path", LONG],
    ["reward-score", "--reward-model", LONG, "--data", "a.jsonl", "--out", "o.jsonl"],
    ["demo", "check", "--data", LONG],
    ["generate", "--model", LONG, "--prompt", "hi"],
    ["fuse", "--model", "m", "--out", LONG],
], ids=lambda a: " ".join(x if len(x) < 20 else "LONG" for x in a))
def test_a_name_too_long_for_a_line_is_abbreviated(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    r = runner.invoke(app, args)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1, r.output
    assert len(errors[0]) < 400 and "(5,0" in errors[0], errors[0]


def test_output_files_are_checked_before_any_model_is_loaded(tmp_path, tmpfs):
    ro = tmpfs("ro", readonly=True)
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    r = runner.invoke(app, ["reward-score", "--reward-model", str(tmp_path / "no-model"),
                            "--data", str(tmp_path / "a.jsonl"), "--out", str(ro / "o.jsonl")])
    assert r.exit_code == 2 and "--out: cannot write" in r.output and "Read-only" in r.output
    r = runner.invoke(app, ["rejection-sample", "--model", "m", "--reward-model", "r",
                            "--prompts", str(tmp_path / "a.jsonl"), "--out", str(tmp_path),
                            "--all-out", str(tmp_path / "all.jsonl")])
    assert r.exit_code == 2 and f"--out: {tmp_path} is a folder" in r.output, r.output
