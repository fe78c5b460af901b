"""Data-parallel training, distributed rejection sampling and failure handling on 2
processes on localhost (ring backend): every result equals the one-process result.

The ranks run in folders of their own (``ranks.spawn``), as on two machines: that shows
which rank wrote what, and that nothing relies on one rank reading another's files.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ranks import environment, launch, spawn

from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.distributed import SINGLE, launched_backend, timeout_seconds
from llama2_mlx.training.data_parallel import step_pieces

WORDS = "one two three four five six seven eight nine ten".split()


def write_task(path: Path, n: int, seed: int) -> None:
    """Prompts of 1-4 words; the answer repeats the first word 1-3 times (rows of varied
    length, so packing, padding and the cuts between ranks all matter)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = rng.sample(WORDS, rng.randint(1, 4))
            f.write(json.dumps({"prompt": " ".join(words),
                                "completion": " ".join([words[0]] * rng.randint(1, 3))}) + "\n")


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_task(d / "train.jsonl", 26, 0)
    write_task(d / "valid.jsonl", 7, 1)
    return d


def rank_dirs(tmp_path, n=2):
    dirs = [tmp_path / f"rank{r}" for r in range(n)]
    for d in dirs:
        d.mkdir(parents=True)
    return dirs


def lora_args(model_dir, data, adapter_path, iters=3, *extra):
    return ["lora-train", "--model", str(model_dir), "--data", str(data),
            "--adapter-path", str(adapter_path), "--iters", str(iters), "--batch-size", "3",
            "--grad-accum", "2", "--max-seq-length", "40", "--rank", "4", "--lr", "3e-3",
            "--save-every", "2", "--val-every", "2", "--val-batches", "-1", "--seed", "3", *extra]


def one_process(args, tmp_path):
    """The same command in this process (a single process: world size 1)."""
    from typer.testing import CliRunner

    from cli.app import app

    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return r


def adapters(folder: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def last_state(folder: Path) -> dict:
    step = sorted((folder / "checkpoints").glob("step_*"))[-1]
    return json.loads((step / "state.json").read_text())


def assert_same_run(two: Path, one: Path, *, atol=1e-5):
    a, b = adapters(two), adapters(one)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-5, err_msg=k)
    s2, s1 = last_state(two), last_state(one)
    for key in ("train_losses", "val_losses", "learning_rates"):
        assert [s for s, _ in s2[key]] == [s for s, _ in s1[key]]
        np.testing.assert_allclose([v for _, v in s2[key]], [v for _, v in s1[key]], rtol=1e-5)


def run_two(args, dirs, timeout=180, **env):
    with spawn(args, dirs, env=environment(**env) if env else None) as ranks:
        codes = ranks.wait(timeout)
        assert codes == [0, 0], ranks.output()
        return ranks.output(0), ranks.output(1)


# --------------------------------------------------------------------------- no processes


def test_step_shares_are_contiguous_even_and_cover_the_step():
    for sizes in ([3, 3], [3, 2], [1], [4, 1, 3], [2, 2, 2, 2]):
        for n in (1, 2, 3, 5):
            pieces = [step_pieces(sizes, r, n) for r in range(n)]
            units = [(j, u) for share in pieces for j, lo, hi in share for u in range(lo, hi)]
            assert units == [(j, u) for j, s in enumerate(sizes) for u in range(s)]
            counts = [sum(hi - lo for _, lo, hi in share) for share in pieces]
            assert max(counts) - min(counts) <= 1
    assert step_pieces([3, 3], 0, 1) == [(0, 0, 3), (1, 0, 3)]  # one process: the micro-batches
    assert step_pieces([3, 3], 1, 2) == [(1, 0, 3)]
    assert step_pieces([1], 0, 2) == []  # a rank without rows still takes part in the sum


def test_a_single_process_is_world_one_and_the_environment_decides(tmp_path):
    assert launched_backend({}) is None and SINGLE.size == 1 and SINGLE.is_main
    assert SINGLE.all_sum(mx.array([2.0])).item() == 2.0
    assert SINGLE.all_gather_objects({"a": 1}) == [{"a": 1}]
    hosts = tmp_path / "hosts.json"
    hosts.write_text("")  # mlx.launch -n 1 writes an empty hostfile
    assert launched_backend({"MLX_HOSTFILE": str(hosts), "MLX_RANK": "0"}) is None
    hosts.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]')
    assert launched_backend({"MLX_HOSTFILE": str(hosts), "MLX_RANK": "1"}) == "ring"
    assert launched_backend({"MLX_WORLD_SIZE": "4"}) == "nccl"
    assert launched_backend({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert timeout_seconds({"LLAMA2_DIST_TIMEOUT": "2.5"}) == 2.5
    assert timeout_seconds({}, "LLAMA2_DIST_START_TIMEOUT") == 300
    with pytest.raises(Llama2Error, match="LLAMA2_DIST_TIMEOUT must be positive"):
        timeout_seconds({"LLAMA2_DIST_TIMEOUT": "0"})


# --------------------------------------------------------------------------- LoRA


def test_lora_on_two_ranks_equals_one_process_and_only_rank_0_writes(tmp_path, model_dir, data):
    """Packed rows, 3 rows a micro-batch, 2 micro-batches a step (rows cut 3/3 and unevenly
    at the epoch's end), validation shared out: adapters, loss curve and validation losses
    equal the one-process run's (float32, 1e-5); rank 1 writes and prints nothing."""
    dirs = rank_dirs(tmp_path)
    out0, out1 = run_two(lora_args(model_dir, data, "ad"), dirs)
    one_process(lora_args(model_dir, data, tmp_path / "one"), tmp_path)
    assert_same_run(dirs[0] / "ad", tmp_path / "one")
    assert not (dirs[1] / "ad").exists()  # rank 1 wrote nothing
    assert sorted(p.name for p in dirs[1].iterdir()) == ["rank.log"]
    assert out1.strip() == ""  # and printed nothing
    assert f"adapters written to {dirs[0] / 'ad'}" in out0 and "val loss" in out0  # absolute


@pytest.mark.slow
def test_lora_padded_batches_on_two_ranks_equal_one_process(tmp_path, model_dir, data):
    dirs = rank_dirs(tmp_path)
    run_two(lora_args(model_dir, data, "ad", 3, "--no-pack"), dirs)
    one_process(lora_args(model_dir, data, tmp_path / "one", 3, "--no-pack"), tmp_path)
    assert_same_run(dirs[0] / "ad", tmp_path / "one")


@pytest.mark.slow
def test_resume_across_world_sizes_equals_the_uninterrupted_run(tmp_path, model_dir, data):
    """A 2-rank checkpoint resumed by 1 process, and a 1-process checkpoint resumed by 2
    ranks (rank 1 cannot see it: rank 0 sends it), both equal the uninterrupted run."""
    import shutil

    one_process(lora_args(model_dir, data, tmp_path / "full", 4), tmp_path)
    # 2 ranks -> 1 process.
    dirs = rank_dirs(tmp_path / "a")
    run_two(lora_args(model_dir, data, "ad", 4), dirs)
    assert_same_run(dirs[0] / "ad", tmp_path / "full")
    resumed = tmp_path / "resumed"
    shutil.copytree(dirs[0] / "ad", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    (resumed / "adapters.safetensors").unlink()
    one_process(lora_args(model_dir, data, resumed, 4, "--resume"), tmp_path)
    assert_same_run(resumed, tmp_path / "full")
    # 1 process -> 2 ranks.
    dirs = rank_dirs(tmp_path / "b")
    shutil.copytree(tmp_path / "full", dirs[0] / "ad")
    shutil.rmtree(dirs[0] / "ad" / "checkpoints" / "step_0000004")
    out0, _ = run_two(lora_args(model_dir, data, "ad", 4, "--resume"), dirs)
    assert "resumed at step 2 of 4" in out0
    assert_same_run(dirs[0] / "ad", tmp_path / "full")
    assert not (dirs[1] / "ad").exists()


# --------------------------------------------------------------------------- reward model


def write_pairs(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = rng.choice(WORDS)
            f.write(json.dumps({"prompt": f"say {w}", "chosen": w,
                                "rejected": " ".join(rng.sample(WORDS, rng.randint(1, 3)))}) + "\n")


@pytest.mark.slow
def test_reward_training_on_two_ranks_equals_one_process(tmp_path, model_dir):
    d = tmp_path / "pairs"
    d.mkdir()
    write_pairs(d / "train.jsonl", 19, 0)
    write_pairs(d / "valid.jsonl", 6, 1)

    def args(out):
        return ["reward-train", "--model", str(model_dir), "--data", str(d), "--out", str(out),
                "--iters", "3", "--batch-size", "3", "--grad-accum", "2", "--rank", "2",
                "--lr", "3e-3", "--save-every", "2", "--eval-every", "2", "--no-progress"]

    dirs = rank_dirs(tmp_path)
    out0, out1 = run_two(args("rm"), dirs)
    one = one_process(args(tmp_path / "one"), tmp_path)
    assert_same_run(dirs[0] / "rm", tmp_path / "one")
    h2 = mx.load(str(dirs[0] / "rm" / "head.safetensors"))["score.weight"]
    h1 = mx.load(str(tmp_path / "one" / "head.safetensors"))["score.weight"]
    np.testing.assert_allclose(np.array(h2), np.array(h1), atol=1e-5)
    assert one.stdout.strip().splitlines()[-1] in out0  # the same held-out metrics line
    assert not (dirs[1] / "rm").exists() and out1.strip() == ""


# --------------------------------------------------------------------------- rejection sampling


@pytest.fixture
def reward_dir(tmp_path, model_dir):
    from conftest import make_model

    from llama2_mlx.rlhf.reward import RewardTrainConfig, prepare_reward_model
    from llama2_mlx.rlhf.reward_model import save_reward_model

    config = RewardTrainConfig()
    rm = prepare_reward_model(make_model(seed=4), config, seed=1)
    return save_reward_model(rm, tmp_path / "rm", base_model=model_dir, fine_tune_type="lora",
                             lora_config=config.lora)


@pytest.mark.slow
def test_rejection_sampling_under_mlx_launch_writes_the_one_process_file(tmp_path, model_dir,
                                                                         reward_dir):
    prompts = tmp_path / "prompts.jsonl"
    rng = random.Random(0)
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.sample(WORDS, 3))}) + "\n"
                               for _ in range(5)))  # 5 prompts: 3 on rank 0, 2 on rank 1

    def args(tag):
        return ["rejection-sample", "--model", str(model_dir), "--reward-model", str(reward_dir),
                "--prompts", str(prompts), "-k", "3", "--max-tokens", "6", "--temp", "1.0",
                "--seed", "7", "--out", str(tmp_path / f"{tag}.jsonl"),
                "--all-out", str(tmp_path / f"{tag}-all.jsonl"), "--no-progress"]

    r = launch(args("two"), tmp_path)
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr
    one = one_process(args("one"), tmp_path)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert (tmp_path / "two-all.jsonl").read_bytes() == (tmp_path / "one-all.jsonl").read_bytes()
    assert r.stdout.count("mean best reward") == 1  # rank 0 alone prints
    assert one.stdout.splitlines()[0] == r.stdout.splitlines()[0]


@pytest.mark.slow
def test_rs_loop_on_two_ranks_equals_one_process(tmp_path, model_dir, reward_dir, monkeypatch):
    """Sampling shared out, the fine-tune data parallel (1 row a micro-batch: each step one
    rank has no rows), the greedy evaluation shared out; rank 0 writes the run folder."""
    prompts = tmp_path / "prompts.jsonl"
    rng = random.Random(1)
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.sample(WORDS, 2))}) + "\n"
                               for _ in range(5)))
    args = ["rs-loop", "--model", str(model_dir), "--reward-model", str(reward_dir),
            "--prompts", str(prompts), "--out", "rs", "--iterations", "1", "-k", "2",
            "--max-tokens", "4", "--iters", "3", "--batch-size", "1", "--max-seq-length", "64",
            "--rank", "2", "--seed", "5", "--no-progress"]
    dirs = rank_dirs(tmp_path)
    run_two(args, dirs)
    (tmp_path / "one").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    one_process(args, tmp_path)
    two, one = dirs[0] / "rs", tmp_path / "one" / "rs"
    for f in ("rs_loop.json", "iter_01/winners.jsonl", "iter_01/samples.jsonl",
              "iter_01/train.jsonl"):
        assert (two / f).read_bytes() == (one / f).read_bytes(), f
    s2, s1 = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (d / "summary.jsonl").read_text().splitlines()] for d in (two, one))
    assert s2 == s1
    assert_same_run(two / "iter_01" / "adapters", one / "iter_01" / "adapters")
    assert sorted(p.name for p in dirs[1].iterdir()) == ["rank.log"]


# --------------------------------------------------------------------------- failures


def _wait_for(path_glob, folder: Path, timeout: float, ranks, least: str = "") -> None:
    """Until ``folder`` holds a path matching ``path_glob`` whose name sorts at or after
    ``least`` (checkpoint folders come and go: only the newest ``keep`` stay)."""
    deadline = time.monotonic() + timeout
    while not [p for p in folder.glob(path_glob) if p.name >= least]:
        if time.monotonic() > deadline or any(p.poll() is not None for p in ranks.procs):
            for p in ranks.procs:  # show where each rank is (faulthandler)
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGABRT)
            time.sleep(3)
            raise AssertionError(f"no {path_glob} in {folder} after {timeout}s:\n{ranks.output()}")
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["kill", pytest.param("stop", marks=pytest.mark.slow)])
def test_a_dead_or_hung_rank_stops_the_other_with_one_line(tmp_path, model_dir, data, how):
    """Rank 1 is killed (its connection drops) or stopped (it hangs, the watchdog's case)
    after the first checkpoints: rank 0 ends within the bound with one ``error:`` line and
    exit status 3, and its last complete checkpoint is intact."""
    dirs = rank_dirs(tmp_path)
    args = lora_args(model_dir, data, "ad", 100000)
    args[args.index("--save-every") + 1] = "1"
    args[args.index("--val-every") + 1] = "0"
    limit = 30 if how == "kill" else 8  # the hang waits for it; the setup must not
    with spawn(args, dirs, env=environment(timeout=limit)) as ranks:
        _wait_for("checkpoints/step_*", dirs[0] / "ad", 120, ranks, least="step_0000002")
        tic = time.monotonic()
        os.kill(ranks.procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        try:
            ranks.procs[0].wait(limit + 20)
        except Exception:
            raise AssertionError(f"rank 0 still running {limit + 20}s after rank 1 was "
                                 f"{how}ed:\n{ranks.output()}")
        took = time.monotonic() - tic
        code, log = ranks.procs[0].returncode, ranks.output(0)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 3 and len(errors) == 1, log
    assert errors[0].startswith("error: rank 0 of 2: ")
    assert ("lost the connection" if how == "kill" else f"within {limit}s") in errors[0]
    assert "last complete checkpoint: ad/checkpoints/step_" in errors[0]
    assert took < (10 if how == "kill" else limit + 10)  # a drop at once, a hang at the limit
    from llama2_mlx.training.checkpoint import list_checkpoints, load_checkpoint

    assert list_checkpoints(dirs[0] / "ad" / "checkpoints")
    path, params, _, state = load_checkpoint(dirs[0] / "ad" / "checkpoints")
    assert state["step"] >= 2 and all(np.isfinite(np.array(v)).all() for v in params.values())


def _rank_pid(marker: str, rank: int, timeout: float) -> int:
    """The pid of rank ``rank`` of the run whose environment holds ``marker`` (the test's
    own processes only: ranks inherit the environment the test gave mlx.launch)."""
    deadline = time.monotonic() + timeout
    want = {f"LLAMA2_TEST_RUN={marker}".encode(), f"MLX_RANK={rank}".encode()}
    while time.monotonic() < deadline:
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                env = set((p / "environ").read_bytes().split(b"\0"))
                comm = (p / "comm").read_text().strip()
            except OSError:
                continue
            if want <= env and comm.startswith("python"):
                return int(p.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process found within {timeout}s")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks in /proc")
def test_under_mlx_launch_a_killed_rank_ends_the_run_with_one_line(tmp_path, model_dir, data):
    """mlx.launch ends the other ranks (SIGTERM) when one fails: rank 0 prints one line."""
    import subprocess
    import uuid

    from ranks import CLI, free_port, launcher

    marker = uuid.uuid4().hex
    args = lora_args(model_dir, data, "ad", 100000)
    args[args.index("--save-every") + 1] = "1"
    cmd = [*launcher(), "-n", "2", "--backend", "ring", "-p", str(free_port(2)), "--", *CLI,
           *args]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=environment(LLAMA2_TEST_RUN=marker),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "ad").glob("checkpoints/step_0000002")):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate(timeout=10)
            time.sleep(0.2)
        os.kill(_rank_pid(marker, 1, 30), signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 of 2: "), err
    assert "last complete checkpoint: ad/checkpoints/step_" in errors[0]


def test_a_peer_that_never_comes_stops_the_start_with_one_line(tmp_path, model_dir, data):
    """Rank 1 never starts: rank 0's start (which waits inside mx.distributed.init, GIL
    held) is ended by the watchdog process within the bound, with one line."""
    dirs = rank_dirs(tmp_path)
    with spawn(lora_args(model_dir, data, "ad"), dirs, env=environment(start_timeout=2),
               only=[0]) as ranks:
        tic = time.monotonic()
        codes = ranks.wait(30)
        took, log = time.monotonic() - tic, ranks.output(0)
    assert codes == [-signal.SIGKILL], log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 0: starting the ring backend: no answer from the other ranks "
                      "within 2s (a rank died or cannot be reached; LLAMA2_DIST_START_TIMEOUT "
                      "sets the limit)"], log
    assert took < 20 and not (dirs[0] / "ad").exists()


def test_commands_that_do_not_run_distributed_are_refused_once(tmp_path):
    dirs = rank_dirs(tmp_path)
    with spawn(["fuse", "--help"], dirs) as ranks:
        assert ranks.wait(60) == [2, 2], ranks.output()
        logs = [ranks.output(r).strip() for r in (0, 1)]
    assert logs[0].startswith("error: llama2 fuse does not run on several processes (those that "
                              "do: lora-train, reward-train, rejection-sample, rs-loop, generate, "
                              "chat)") and "\n" not in logs[0]
    assert logs[1] == ""
