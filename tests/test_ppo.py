"""The light PPO (§3.2.3) on the bundled demo model: with a rule-based reward (short
answers) the held-out mean reward rises within a few iterations while the KL to pi_0
stays bounded; the reference policy is the policy's own weights with the adapters off;
exact resume, early stopping, the folder's files; the paper's numbers as the preset."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from llama2_mlx.demo import default_model_path
from llama2_mlx.demo.tasks import make_examples, to_messages
from llama2_mlx.errors import Llama2Error
from llama2_mlx.rlhf.ppo import PPOConfig, iteration_prompts, preset_config
from llama2_mlx.rlhf.ppo_run import ppo
from llama2_mlx.training.metrics import read_metrics

MAX_WORDS = 4


def short_answers(prompt, answers, is_safety_prompt):
    """A rule-based R_c: the probability falls with the answer's word count past 4."""
    return [float(1 / (1 + np.exp(len(a.split()) - MAX_WORDS))) for a in answers]


@pytest.fixture(scope="module")
def base():
    from llama2_mlx.checkpoints.shared import SharedBase

    # float32: bf16 logits would add rounding noise to the small log-ratios of the KL.
    return SharedBase.load(default_model_path(), "float32")


@pytest.fixture(scope="module")
def prompts():
    qs = [to_messages(e)[:-1] for t in ("spell", "reverse")
          for e in make_examples(t, 40, 0, "train", unique=True)]
    return qs[:24] + qs[40:64], qs[24:40] + qs[64:80]  # training prompts, held-out prompts


def config(**over) -> PPOConfig:
    return preset_config("demo", **{"iterations": 4, "progress": False, **over})


def test_the_paper_numbers_are_the_defaults_and_the_presets():
    c = PPOConfig()
    assert (c.batch_size, c.minibatch_size, c.ppo_clip, c.lr, c.beta) == (512, 64, 0.2, 1e-6, 0.01)
    assert (c.betas, c.eps, c.weight_decay, c.grad_clip) == ((0.9, 0.95), 1e-5, 0.1, 1.0)
    assert c.settings() == preset_config("llama2-ppo").settings()
    assert preset_config("llama2-ppo-70b").beta == 0.005
    assert preset_config("demo", lr=1e-3).lr == 1e-3
    opt = __import__("llama2_mlx.rlhf.ppo", fromlist=["x"]).make_ppo_optimizer(c)
    assert (opt.betas, opt.eps, opt.weight_decay) == ([0.9, 0.95], 1e-5, 0.1)
    assert opt.learning_rate.item() == pytest.approx(1e-6)


@pytest.mark.parametrize("over, msg", [
    ({"k": 1}, "k must be at least 2"), ({"batch_size": 30}, "not a multiple of k"),
    ({"minibatch_size": 64}, "minibatch_size 64 is above batch_size 32"),
    ({"ppo_clip": 1.0}, r"ppo_clip must be in \(0, 1\)"), ({"beta": -0.1}, "beta must be at least 0"),
    ({"generation": {"temp": 0.0}}, "temp must be above 0"),
])
def test_bad_settings_are_one_line_errors_naming_the_option(over, msg):
    with pytest.raises(Llama2Error, match=msg):
        config(**over)


def test_iteration_prompts_walk_through_shuffled_epochs():
    seen = [i for it in (1, 2, 3) for i in iteration_prompts(6, 4, seed=0, iteration=it)]
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:12]) == list(range(6))
    assert iteration_prompts(6, 4, 0, 2) == iteration_prompts(6, 4, 0, 2)


def test_held_out_reward_rises_while_the_kl_stays_bounded(base, prompts, tmp_path):
    train, held = prompts
    policy, tok = base.policy()
    result = ppo(policy, tok, short_answers, train, tmp_path / "run", config(), eval_prompts=held,
                 log=lambda s: None)
    rewards = [e["eval_reward"] for e in result.evals]
    kls = [e["eval_kl"] for e in result.evals]
    assert [e["iteration"] for e in result.evals] == [0, 1, 2, 3, 4]
    assert kls[0] == 0.0  # pi_0 is the starting policy (its adapters off; lora_b still zero)
    assert rewards[-1] > rewards[0] + 0.05, rewards
    assert 0 < kls[-1] < 2.0, kls  # measured 0.73 nats per answer at iteration 4
    assert len(result.history) == 4 and all(h["steps"] == 4 for h in result.history)
    # The folder: adapters for `generate --adapter-path`, the best held-out ones, metrics.
    out = tmp_path / "run"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["iteration"] == 4 and cfg["lora_parameters"]["rank"] == 4
    assert json.loads((out / "best" / "adapter_config.json").read_text())["iteration"] == 4
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "ppo"] == [1, 2, 3, 4]
    assert [r["eval_reward"] for r in recs if r["kind"] == "eval"] == rewards
    from llama2_mlx.models.lora import load_adapters

    again, _ = base.policy()
    load_adapters(again, out)
    ids = mx.array([tok.encode_chat(held[0])])
    np.testing.assert_allclose(np.array(again(ids)), np.array(policy(ids)), atol=1e-5)


def test_a_resumed_run_repeats_the_uninterrupted_one(base, prompts, tmp_path):
    train, held = prompts
    run = lambda out, n, **kw: ppo(base.policy()[0], base.tokenizer, short_answers, train, out,
                                   config(iterations=n, val_every=2), eval_prompts=held[:8],
                                   log=lambda s: None, **kw)
    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 3, resume=True)
    assert resumed.resumed_from == 2
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]
    assert strip(resumed.history) == strip(straight.history) and resumed.evals == straight.evals
    assert (tmp_path / "a" / "adapters.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapters.safetensors").read_bytes()
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == \
        strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    # Other settings are refused; a finished folder is refused without --resume/--overwrite.
    with pytest.raises(Llama2Error, match="beta"):
        ppo(base.policy()[0], base.tokenizer, short_answers, train, tmp_path / "b",
            config(iterations=3, val_every=2, beta=0.5), eval_prompts=held[:8], resume=True)
    with pytest.raises(Llama2Error, match="overwrite"):
        run(tmp_path / "b", 3)


def test_early_stop_on_the_held_out_kl(base, prompts, tmp_path):
    train, held = prompts
    result = ppo(base.policy()[0], base.tokenizer, short_answers, train, tmp_path / "s",
                 config(iterations=6, kl_stop=0.01), eval_prompts=held[:8], log=lambda s: None)
    assert result.stopped is not None and "kl_stop" in result.stopped
    assert len(result.history) < 6 and result.evals[-1]["eval_kl"] > 0.01
    state = json.loads(next((tmp_path / "s" / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["stopped"] == result.stopped


# --------------------------------------------------------------------------- the command


def test_ppo_cli_on_the_demo_model(tmp_path, prompts, demo_reward_model):
    from typer.testing import CliRunner

    from cli.app import app

    runner = CliRunner()
    train, held = prompts
    files = {}
    for name, ps in (("train", train[:8]), ("held", held[:4])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"messages": p}) + "\n" for p in ps))
    out = tmp_path / "out"
    args = ["ppo", "--model", str(default_model_path()), "--reward-model", str(demo_reward_model),
            "--prompts", str(files["train"]), "--eval-prompts", str(files["held"]),
            "--out", str(out), "--preset", "demo", "--iterations", "2", "--batch-size", "8",
            "--minibatch-size", "4", "--max-tokens", "6", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "shares the policy's base weights" in r.stderr
    assert r.stdout.splitlines()[0].startswith("iteration 0: held-out mean reward")
    assert len(r.stdout.splitlines()) == 3 and "iteration 2:" in r.stdout
    assert (out / "adapters.safetensors").exists() and (out / "best" / "adapter_config.json").exists()
    settings = json.loads((out / "ppo.json").read_text())
    assert (settings["beta"], settings["ppo_clip"], settings["eps"]) == (0.01, 0.2, 1e-5)
    # `generate --adapter-path OUT` uses the adapters.
    g = runner.invoke(app, ["generate", "--model", str(default_model_path()), "--adapter-path",
                            str(out), "--prompt", "Spell the word cat.", "--max-tokens", "4"])
    assert g.exit_code == 0, g.output
    # Continued with more iterations; refused without --resume or --overwrite.
    more = list(args)
    more[more.index("--iterations") + 1] = "3"
    r = runner.invoke(app, more + ["--resume"])
    assert r.exit_code == 0 and "resuming" in r.stderr and "iteration 3:" in r.stdout, r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    # Bad input: one error line naming the option or the file, exit 2.
    for extra, message in [(["-k", "1"], "error: -k must be at least 2"),
                           (["--batch-size", "10"], "error: --batch-size 10 is not a multiple of --k 4"),
                           (["--ppo-clip", "1.5"], "error: --ppo-clip must be in (0, 1)"),
                           (["--preset", "nope"], None)]:
        r = runner.invoke(app, args + extra + ["--overwrite"])
        assert r.exit_code == 2, (extra, r.output)
        if message is not None:
            assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    missing = tmp_path / "missing.jsonl"
    r = runner.invoke(app, [*args[:6], str(missing), *args[7:], "--overwrite"])
    assert r.exit_code == 2 and str(missing) in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_from_adapters_pi_0_is_the_starting_adapters_not_the_base(base, prompts, tmp_path):
    from llama2_mlx.models.lora import adapter_weights, load_adapters, read_adapter_config

    train, held = prompts
    first = ppo(base.policy()[0], base.tokenizer, short_answers, train, tmp_path / "first",
                config(iterations=2, val_every=2), eval_prompts=held[:8], log=lambda s: None)
    assert first.evals[-1]["eval_kl"] > 0  # these adapters are away from the base
    policy, tok = base.policy()
    load_adapters(policy, tmp_path / "first")
    start = {k: np.array(v) for k, v in adapter_weights(policy).items()}
    again = ppo(policy, tok, short_answers, train, tmp_path / "second",
                config(iterations=1), eval_prompts=held[:8],
                lora_config=read_adapter_config(tmp_path / "first")[1], log=lambda s: None)
    assert again.evals[0]["eval_kl"] == pytest.approx(0.0, abs=1e-6)  # pi_0 = the start
    assert again.evals[-1]["eval_kl"] > 0
    # The trained adapters are the policy's; the swap for pi_0 put them back each time.
    moved = adapter_weights(policy)
    assert any(not np.array_equal(np.array(moved[k]), start[k]) for k in start)


@pytest.mark.slow
def test_a_longer_run_keeps_raising_the_held_out_reward(base, prompts, tmp_path):
    train, held = prompts
    result = ppo(base.policy()[0], base.tokenizer, short_answers, train, tmp_path / "long",
                 config(iterations=10, val_every=2), eval_prompts=held, log=lambda s: None)
    rewards = [e["eval_reward"] for e in result.evals]
    assert rewards == sorted(rewards) and rewards[-1] > rewards[0] + 0.15, rewards
    assert result.evals[-1]["eval_kl"] < 8.0  # measured 4.1 nats an answer (beta 0.01)


def test_micro_batches_sum_to_the_minibatch_gradient(base, prompts, tmp_path):
    from llama2_mlx.formats.safetensors import read_safetensors

    train, held = prompts
    for name, micro in (("whole", None), ("micro", 3)):
        ppo(base.policy()[0], base.tokenizer, short_answers, train, tmp_path / name,
            config(iterations=1, micro_batch_size=micro), eval_prompts=held[:4],
            log=lambda s: None)
    a, b = (read_safetensors(tmp_path / n / "adapters.safetensors") for n in ("whole", "micro"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), atol=2e-5)
