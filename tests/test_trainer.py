"""The schedule, the generic loop (accumulation, resume, NaN guard), options, the CLI and
a small proof that answer-only LoRA training learns the answers and not the prompts."""

from __future__ import annotations

import json
import math
import random

import mlx.core as mx
import numpy as np
import pytest
from conftest import CORPUS_WORDS, make_model
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from llama2_mlx.errors import Llama2Error
from llama2_mlx.models.lora import LoRAConfig, apply_lora
from llama2_mlx.training.checkpoint import list_checkpoints
from llama2_mlx.training.data import Sample, SFTBatches, load_samples
from llama2_mlx.training.schedule import lr_schedule
from llama2_mlx.training.sft import SFTOptions, lora_train, sft_loss
from llama2_mlx.training.trainer import StopTraining, TrainConfig, evaluate, train

runner = CliRunner()



def random_samples(n, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        L = rng.randint(6, 18)
        p = rng.randint(2, L - 2)
        out.append(Sample([1] + rng.randint(3, 500, L - 1).tolist(), [False] * p + [True] * (L - p), f"s{i}"))
    return out


def lora_model(dropout=0.0):
    model = make_model()
    mx.random.seed(0)
    return apply_lora(model, LoRAConfig(rank=4, dropout=dropout))


def test_schedule_warmup_cosine_to_a_floor():
    lr = lr_schedule(1e-3, total_steps=12, warmup=2, min_lr_ratio=0.1)
    vals = [lr(s).item() for s in range(12)]
    np.testing.assert_allclose(vals[:3], [5e-4, 1e-3, 1e-3], rtol=1e-6)
    assert all(a >= b for a, b in zip(vals[2:], vals[3:]))
    np.testing.assert_allclose(vals[-1], 1e-4, rtol=1e-5)
    np.testing.assert_allclose(lr(6.5).item(), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # cosine midpoint
    with pytest.raises(Llama2Error, match="min_lr_ratio"):
        lr_schedule(1e-3, 10, min_lr_ratio=2)


def test_grad_accumulation_and_checkpointing_equal_one_large_batch():
    samples = random_samples(4)
    metrics = []
    for bs, ga, ckpt in ((4, 1, False), (2, 2, False), (1, 4, False), (2, 2, True)):
        model = lora_model()
        b = SFTBatches(samples, bs, 32, pack=False, seed=0)
        cfg = TrainConfig(lr=1e-3, iters=2, grad_accum=ga, clip=0, val_every=0, save_every=0,
                          progress=False, grad_checkpoint=ckpt)
        out = []
        train(model, sft_loss, b, cfg, on_step=lambda s, m: out.append(m))
        metrics.append([v for m in out for v in (m["loss"], m["grad_norm"])])
    for m in metrics[1:]:
        np.testing.assert_allclose(m, metrics[0], rtol=1e-5)
    with pytest.raises(Llama2Error, match="grad_checkpoint cannot be combined with dropout"):
        train(lora_model(dropout=0.1), sft_loss, b, TrainConfig(iters=1, grad_checkpoint=True, progress=False))


def run(tmp_path, stop_at=None, resume=False, iters=6, log=None):
    model = lora_model(dropout=0.2)
    b = SFTBatches(random_samples(24), 2, 40, pack=True, seed=0)
    cfg = TrainConfig(lr=3e-3, warmup=1, iters=iters, save_every=2, val_every=0, progress=False,
                      checkpoint_dir=tmp_path / "ckpt", resume=resume, seed=5)

    def on_step(step, m):
        if step == stop_at:
            raise StopTraining

    result = train(model, sft_loss, b, cfg, on_step=on_step, log=log)
    return result, dict(tree_flatten(model.trainable_parameters()))


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    full, full_params = run(tmp_path / "a")
    part, _ = run(tmp_path / "b", stop_at=3)
    assert part.stopped and part.steps == 3
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "ckpt")] == ["step_0000002"]
    resumed, params = run(tmp_path / "b", resume=True)
    assert resumed.resumed_from == 2
    np.testing.assert_allclose([l for _, l in resumed.train_losses],
                               [l for _, l in full.train_losses], rtol=1e-5)
    assert [s for s, _ in resumed.train_losses] == list(range(1, 7))
    for k in full_params:
        np.testing.assert_allclose(np.array(params[k]), np.array(full_params[k]), atol=1e-6)
    # Atomic writes leave no temporary files behind.
    assert not [p for p in (tmp_path / "b" / "ckpt").iterdir() if p.name.startswith(".")]


def test_resuming_a_finished_run_trains_nothing_and_says_so(tmp_path):
    done, done_params = run(tmp_path, iters=4)
    logs = []
    again, params = run(tmp_path, resume=True, iters=4, log=logs.append)
    assert (again.steps, again.resumed_from, again.total_steps) == (4, 4, 4)
    assert again.train_losses == done.train_losses and not again.stopped
    assert logs[-1].startswith("trained 0 steps (resumed at step 4 of 4) in ")
    for k in done_params:
        np.testing.assert_array_equal(np.array(params[k]), np.array(done_params[k]))


def test_warmup_ratio_is_a_share_of_the_steps_with_warmup_as_the_floor():
    paper = TrainConfig(warmup=5, warmup_ratio=0.03)  # 3% of the steps, at least 5
    assert [paper.warmup_steps(n) for n in (1000, 100, 3)] == [30, 5, 2]  # never all steps
    assert TrainConfig(warmup=7).warmup_steps(3) == 7  # a plain warmup stays as given
    with pytest.raises(Llama2Error, match=r"warmup_ratio must be in \[0, 1\)"):
        TrainConfig(warmup_ratio=1.0)
    b = SFTBatches(random_samples(8), 2, 40, pack=False, seed=0)
    config = TrainConfig(lr=1e-3, warmup_ratio=0.5, iters=4, val_every=0, save_every=0,
                         progress=False)
    result = train(lora_model(), sft_loss, b, config)
    np.testing.assert_allclose([lr for _, lr in result.learning_rates][:3], [5e-4, 1e-3, 1e-3],
                               rtol=1e-6)


def test_progress_bar_shows_its_fields_and_logs_above():
    import io

    from rich.console import Console

    from llama2_mlx.io.progress import ProgressBar

    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    with ProgressBar("demo", 4, ("loss {loss}", "[{n}] items"), console=console) as bar:
        bar.update(2, loss="0.50", n="7")
        bar.log("a [line] above")
    text = out.getvalue()
    assert "demo" in text and "2/4" in text and "loss 0.50" in text and "[7] items" in text
    assert "a [line] above" in text
    quiet = io.StringIO()
    with ProgressBar("demo", 4, enabled=False, console=Console(file=quiet)) as bar:
        bar.update(1)
        bar.log("still printed")
    assert quiet.getvalue() == "still printed\n"


def test_resume_with_other_settings_is_refused(tmp_path):
    run(tmp_path, iters=2)
    with pytest.raises(Llama2Error, match=r"resume: .*step_0000002 was made with total_steps=2, this run has total_steps=6"):
        run(tmp_path, resume=True, iters=6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def flaky(model, batch):
        s, n = sft_loss(model, batch)
        calls.append(1)
        return (s * math.nan if len(calls) >= 4 else s), n

    model = lora_model()
    b = SFTBatches(random_samples(16), 2, 40, pack=True, seed=0)
    cfg = TrainConfig(lr=1e-3, iters=6, save_every=2, val_every=0, progress=False,
                      checkpoint_dir=tmp_path)
    saved = []
    with pytest.raises(Llama2Error, match=r"training diverged at step 4: loss nan; .*last good checkpoint: .*step_0000002"):
        train(model, flaky, b, cfg, on_save=lambda m, s: saved.append(s))
    assert saved == [2]
    ckpt = mx.load(str(list_checkpoints(tmp_path)[-1] / "params.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in ckpt.values())
    assert all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(model.trainable_parameters()))


def test_options_preset_config_file_and_command_line(tmp_path):
    o = SFTOptions.resolve(preset="llama2-sft")
    assert (o.train.lr, o.train.weight_decay, o.data.max_seq_length, o.train.epochs, o.data.batch_size * o.train.grad_accum) == (2e-5, 0.1, 4096, 2, 64)
    o = SFTOptions.resolve({"batch_size": 4}, preset="llama2-sft")
    assert (o.data.batch_size, o.train.grad_accum) == (4, 16)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: llama2-sft\nrank: 16\nmax-seq-length: 512\niters: 10\nkeys: q_proj,v_proj\n")
    o = SFTOptions.resolve({"rank": 4, "pack": False}, config_file=cfg)
    assert (o.lora.rank, o.data.max_seq_length, o.train.iters, o.train.epochs, o.data.pack, o.train.lr) == (4, 512, 10, None, False, 2e-5)
    assert o.lora.keys == ("self_attn.q_proj", "self_attn.v_proj")  # q_proj,v_proj
    o = SFTOptions.resolve({"epochs": 1}, config_file=cfg)
    assert (o.train.iters, o.train.epochs) == (None, 1.0)
    (tmp_path / "bad.json").write_text('{"rnak": 4}')
    with pytest.raises(Llama2Error, match=r"bad.json: unknown option 'rnak'"):
        SFTOptions.resolve(config_file=tmp_path / "bad.json")
    with pytest.raises(Llama2Error, match=r"command line: option rank = 'x' is not a int"):
        SFTOptions.resolve({"rank": "x"})


KEYS = {"france": "paris", "italy": "rome", "hello": "world", "quick": "brown fox"}


def task_file(path, n, seed):
    """Prompt: a key word and three noise words; answer: the key's fixed word(s)."""
    rng = random.Random(seed)
    noise = [w for w in CORPUS_WORDS if w not in KEYS and w not in KEYS.values()]
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.choice(list(KEYS))
            f.write(json.dumps({"prompt": " ".join([k] + rng.sample(noise, 3)), "completion": KEYS[k]}) + "\n")


def test_answer_only_lora_learns_the_answers_not_the_prompts(tmp_path, tok):
    task_file(tmp_path / "train.jsonl", 48, seed=0)
    task_file(tmp_path / "valid.jsonl", 16, seed=1)
    valid = load_samples(tmp_path / "valid.jsonl", tok)
    prompts = [Sample(s.tokens, [not t for t in s.targets], s.where) for s in valid]  # prompt tokens as targets
    held_out = SFTBatches(valid, 16, 256, shuffle=False)
    prompt_batches = SFTBatches(prompts, 16, 256, shuffle=False)
    model = make_model()
    a0, p0 = evaluate(model, sft_loss, held_out(0))[0], evaluate(model, sft_loss, prompt_batches(0))[0]
    opts = SFTOptions.resolve({"data": str(tmp_path), "adapter_path": str(tmp_path / "ad"), "iters": 30,
                               "batch_size": 4, "lr": 1e-3, "warmup": 2, "max_seq_length": 64,
                               "val_every": 0, "save_every": 0, "progress": False})
    lora_train(opts, model, tok, log=lambda s: None)
    a1, p1 = evaluate(model, sft_loss, held_out(0))[0], evaluate(model, sft_loss, prompt_batches(0))[0]
    print(f"held-out answer loss {a0:.3f} -> {a1:.3f}; prompt-token loss {p0:.3f} -> {p1:.3f}")
    assert a1 < 0.5 * a0
    assert p1 > p0 - 0.1 * (a0 - a1)  # the prompts are not trained


def test_cli_lora_train_config_resume_and_errors(tmp_path, model_dir, tok):
    from cli.app import app

    data = tmp_path / "data"
    data.mkdir()
    task_file(data / "train.jsonl", 12, 0)
    task_file(data / "valid.jsonl", 4, 1)
    (tmp_path / "c.yaml").write_text("rank: 4\nlr: 0.001\nbatch-size: 2\n")
    ad = tmp_path / "ad"
    common = ["lora-train", "--model", str(model_dir), "--data", str(data), "--adapter-path", str(ad),
              "--max-seq-length", "64", "--save-every", "2", "--val-every", "2", "--config", str(tmp_path / "c.yaml")]
    r = runner.invoke(app, common + ["--iters", "4", "--no-pack", "--keys", "attn"])
    assert r.exit_code == 0, r.output
    assert "val loss" in r.output and "non-padding tokens (padded)" in r.output
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["num_layers"] == 2
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    from llama2_mlx.checkpoints.load import load

    tuned, _ = load(model_dir, adapter_path=ad)
    x = mx.array([tok.encode("hello world")])
    assert not np.allclose(np.array(tuned(x)), np.array(make_model()(x)), atol=1e-4)

    r = runner.invoke(app, common + ["--iters", "5", "--no-pack", "--keys", "attn", "--resume"])
    assert r.exit_code == 2 and "total_steps=4, this run has total_steps=5" in r.output
    (data / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    files = lambda: {p.relative_to(ad): p.read_bytes() for p in ad.rglob("*")  # noqa: E731
                     if p.is_file() and p.name != ".llama2.lock"}
    before = files()
    r = runner.invoke(app, common + ["--iters", "1"])  # a finished run there: refused
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "holds an earlier run's results" in r.output and "--overwrite replaces it" in r.output
    r = runner.invoke(app, common + ["--iters", "1", "--overwrite"])
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "train.jsonl line 2: invalid JSON" in errors[0]
    assert files() == before and not (ad / ".previous-run").exists()  # the earlier run, whole
    r = runner.invoke(app, ["lora-train", "--model", str(model_dir), "--data", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "--data:" in r.output and "is not a folder" in r.output


def test_evaluate_runs_in_eval_mode_and_gives_the_training_mode_back():
    model = make_model()
    seen = []

    def loss_fn(m, batch):
        seen.append(m.training)
        if batch == "bad":
            raise RuntimeError("bad batch")
        return mx.array(2.0), mx.array(1)

    model.train()
    assert evaluate(model, loss_fn, ["ok", "ok"]) == (2.0, 2) and seen == [False, False]
    assert model.training
    with pytest.raises(RuntimeError):
        evaluate(model, loss_fn, ["bad"])
    assert model.training


def test_a_refused_run_leaves_an_earlier_runs_checkpoints(tmp_path):
    run(tmp_path, iters=2)
    before = list_checkpoints(tmp_path / "ckpt")
    b = SFTBatches(random_samples(4), 2, 40, pack=True, seed=0)
    cfg = TrainConfig(iters=1, grad_checkpoint=True, progress=False, checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(Llama2Error, match="grad_checkpoint cannot be combined with dropout"):
        train(lora_model(dropout=0.1), sft_loss, b, cfg)
    assert before and list_checkpoints(tmp_path / "ckpt") == before


def test_resume_into_other_trainable_parameters_names_the_file_and_tensor(tmp_path):
    run(tmp_path, iters=2)
    model = apply_lora(make_model(), LoRAConfig(rank=8))  # rank 4 was saved
    b = SFTBatches(random_samples(24), 2, 40, pack=True, seed=0)
    cfg = TrainConfig(lr=3e-3, warmup=1, iters=2, save_every=2, val_every=0, progress=False,
                      checkpoint_dir=tmp_path / "ckpt", resume=True, seed=5)
    with pytest.raises(Llama2Error, match=r"step_0000002/params.safetensors: tensor \S+lora_a "
                                          r"has shape \(\d+, 4\), the model expects \(\d+, 8\)"):
        train(model, sft_loss, b, cfg)
