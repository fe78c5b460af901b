"""Two reward models and the paper's gate (§3.2.6): R_c = R_s if the prompt is a safety
prompt or R_s < 0.15, else R_h, on probabilities (sigmoid of each head's output); the
gate on constructed scores, then end to end with two tiny reward models built on the
policy's base (rejection-sample, reward-score, reward-train --kind, the server's best_of)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from llama2_mlx.checkpoints.load import load
from llama2_mlx.models.lora import LoRAConfig, apply_lora, lora_layers
from llama2_mlx.rlhf.gate import (
    SAFETY_THRESHOLD,
    RewardScorer,
    gated_reward,
    probability,
)
from llama2_mlx.rlhf.reward_model import (
    RewardModel,
    load_reward_model,
    save_reward_model,
    score_responses,
)

runner = CliRunner()


def user(text):
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- the gate


def test_the_threshold_is_the_papers():
    assert SAFETY_THRESHOLD == 0.15


def test_gate_each_branch_on_constructed_scores():
    helpful = np.array([0.9, 0.9, 0.9, 0.9, 0.2])
    safety = np.array([0.8, 0.1, 0.6, 0.15, 0.149])
    flags = np.array([True, False, False, False, False])
    got = gated_reward(helpful, safety, flags)
    np.testing.assert_array_equal(got, [
        0.8,    # a safety prompt: the safety reward, however safe the answer
        0.1,    # safety below the threshold: the safety reward
        0.9,    # safe enough, not a safety prompt: the helpfulness reward
        0.9,    # exactly 0.15 is not below it (the paper's strict "<"): helpfulness
        0.149,  # just below: safety, even though it is lower than the helpfulness score
    ])
    # Broadcasts: one flag for all the answers to one prompt.
    np.testing.assert_array_equal(gated_reward(helpful, safety, True), safety)


def test_scorer_puts_the_threshold_on_probabilities_not_raw_outputs():
    scorer = RewardScorer(helpful=None, safety=object())
    logit = float(np.log(SAFETY_THRESHOLD / (1 - SAFETY_THRESHOLD)))  # sigmoid -> 0.15
    raw_h, raw_s = [3.0, 3.0, -5.0], [logit - 0.01, logit + 0.01, 2.0]
    s = scorer.combine(raw_h, raw_s, False)
    np.testing.assert_allclose(s.helpfulness, 1 / (1 + np.exp(-np.array(raw_h))))
    np.testing.assert_allclose(s.safety, 1 / (1 + np.exp(-np.array(raw_s))))
    np.testing.assert_allclose(s.rewards, [s.safety[0], s.helpfulness[1], s.helpfulness[2]])
    assert s.safety[0] < 0.15 < s.safety[1]
    # One model: its raw outputs, as before there was a gate.
    assert RewardScorer(helpful=None).combine(raw_h, None, False).rewards == raw_h
    assert probability([0.0]).tolist() == [0.5]


# --------------------------------------------------------------------------- end to end


def make_reward_model(base_dir, out, seed, kind):
    """A LoRA reward model on the base with random adapters and a head scaled so that
    its probabilities spread over (0, 1)."""
    mx.random.seed(seed)
    rm = RewardModel.from_policy(load(base_dir)[0])
    config = LoRAConfig(rank=2)
    apply_lora(rm, config)
    for _, layer in lora_layers(rm):
        layer.lora_b = 0.5 * mx.random.normal(layer.lora_b.shape)
    rm.score.weight = 4.0 * mx.random.normal(rm.score.weight.shape)
    return save_reward_model(rm, out, base_model=base_dir, lora_config=config,
                             extra={"kind": kind})


@pytest.fixture(scope="module")
def rms(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    return (make_reward_model(model_dir, root / "helpful", 1, "helpfulness"),
            make_reward_model(model_dir, root / "safety", 2, "safety"))


def probabilities(rm_dir, prompt, texts):
    rm, tok = load_reward_model(rm_dir)
    return probability(score_responses(rm, tok, [prompt] * len(texts), texts)).tolist()


def test_rejection_sample_cli_picks_the_gated_best(model_dir, rms, tmp_path):
    helpful_dir, safety_dir = rms
    texts = ["count one two", "hello world", "the quick fox", "spell paris", "what is ten",
             "reverse dog", "capital france", "lazy llama"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, **({"safety": True} if i == 0 else {})})
                               + "\n" for i, t in enumerate(texts)))
    out, all_out = tmp_path / "best.jsonl", tmp_path / "all.jsonl"
    r = runner.invoke(app, [
        "rejection-sample", "--model", str(model_dir), "--reward-model", str(helpful_dir),
        "--safety-reward-model", str(safety_dir), "--prompts", str(prompts), "-k", "6",
        "--max-tokens", "5", "--temp", "1.5", "--seed", "1", "--out", str(out),
        "--all-out", str(all_out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "2 of the 2 reward models share the policy's base weights" in r.stderr
    best = [json.loads(x) for x in out.read_text().splitlines()]
    every = [json.loads(x) for x in all_out.read_text().splitlines()]
    branches = {"safety prompt": 0, "unsafe answer": 0, "helpful answer": 0}
    differs = 0
    for i, (b, a) in enumerate(zip(best, every)):
        prompt = user(texts[i])
        answers = [s["text"] for s in a["samples"]]
        # Each model's own probability, scored independently of the scorer.
        h, s = probabilities(helpful_dir, prompt, answers), probabilities(safety_dir, prompt, answers)
        np.testing.assert_allclose([x["helpfulness_reward"] for x in a["samples"]], h, atol=1e-5)
        np.testing.assert_allclose([x["safety_reward"] for x in a["samples"]], s, atol=1e-5)
        want = [sj if (i == 0 or sj < 0.15) else hj for hj, sj in zip(h, s)]
        np.testing.assert_allclose([x["reward"] for x in a["samples"]], want, atol=1e-5)
        pool = [j for j, x in enumerate(a["samples"]) if x["finished"]] or range(len(answers))
        pick = max(pool, key=lambda j: want[j])
        assert a["best"] == pick and b["messages"][-1]["content"] == answers[pick]
        assert b["reward"] == pytest.approx(want[pick], abs=1e-5)
        assert b.get("safety", False) == (i == 0) == a.get("safety", False)
        differs += pick != max(pool, key=lambda j: h[j])
        for j in pool:
            kind = ("safety prompt" if i == 0 else "unsafe answer" if s[j] < 0.15
                    else "helpful answer")
            branches[kind] += 1
    assert all(branches.values()), branches  # every branch of the gate was taken
    assert differs, "the gate never changed the winner: the test shows nothing"


def test_both_reward_models_share_the_policys_base(model_dir, rms):
    from llama2_mlx.rlhf.rejection import load_models

    base, _, scorer, _ = load_models(model_dir, None, rms[0], None, lambda s: None, rms[1])
    assert scorer.gated and base.shared_by(scorer.helpful) and base.shared_by(scorer.safety)


def test_reward_score_cli_writes_the_gated_reward_and_both_components(model_dir, rms, tmp_path):
    data, out = tmp_path / "resp.jsonl", tmp_path / "scored.jsonl"
    answers = ["d o g", "dog", "the dog", "hello world", "one two three", "paris", "rome", "no"]
    recs = [{"prompt": "spell dog", "response": a, **({"safety": True} if flag else {})}
            for a in answers for flag in (False, True)]
    data.write_text("".join(json.dumps(x) + "\n" for x in recs))
    r = runner.invoke(app, ["reward-score", "--reward-model", str(rms[0]), "--safety-reward-model",
                            str(rms[1]), "--data", str(data), "--out", str(out)])
    assert r.exit_code == 0, r.output
    got = [json.loads(x) for x in out.read_text().splitlines()]
    h = probabilities(rms[0], user("spell dog"), [x["response"] for x in got])
    s = probabilities(rms[1], user("spell dog"), [x["response"] for x in got])
    np.testing.assert_allclose([x["helpfulness_reward"] for x in got], h, atol=1e-5)
    np.testing.assert_allclose([x["safety_reward"] for x in got], s, atol=1e-5)
    flags = [x.get("safety", False) for x in got]
    want = [sj if f or sj < 0.15 else hj for hj, sj, f in zip(h, s, flags)]
    np.testing.assert_allclose([x["reward"] for x in got], want, atol=1e-5)
    # The flag decided some reward: a safe-enough answer scored by safety on a safety prompt.
    assert any(f and sj >= 0.15 and abs(hj - sj) > 1e-3 for hj, sj, f in zip(h, s, flags))


def test_the_kinds_are_checked_and_recorded(model_dir, rms, tmp_path):
    # The helpfulness model given as the safety one: one error line, exit 2.
    (tmp_path / "x.jsonl").write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    r = runner.invoke(app, ["reward-score", "--reward-model", str(rms[0]), "--safety-reward-model",
                            str(rms[0]), "--data", str(tmp_path / "x.jsonl"), "--out",
                            str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: --safety-reward-model {rms[0]}: is a helpfulness")
    # reward-train --kind safety records it; reward-eval reports per rating for it.
    data = tmp_path / "pairs.jsonl"
    ratings = ["significantly better", "better", "slightly better", "unsure"]
    data.write_text("".join(json.dumps({"prompt": f"how to {w}", "chosen": "I cannot help",
                                        "rejected": f"here is how to {w}", "rating": ratings[i % 4]})
                            + "\n" for i, w in enumerate("dog fox cat llama paris rome ten one".split())))
    out = tmp_path / "safety-rm"
    r = runner.invoke(app, ["reward-train", "--model", str(model_dir), "--data", str(data),
                            "--out", str(out), "--kind", "safety", "--iters", "2", "--batch-size",
                            "2", "--rank", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "reward_config.json").read_text())["kind"] == "safety"
    r = runner.invoke(app, ["reward-eval", "--reward-model", str(out), "--data", str(data)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[-1] == "kind safety"
    for rating in ("significantly_better", "better", "slightly_better", "negligibly_better"):
        assert any(x.startswith(f"accuracy {rating} ") and x.endswith("(2 pairs)") for x in lines)
    r = runner.invoke(app, ["reward-train", "--model", str(model_dir), "--data", str(data),
                            "--out", str(out), "--kind", "harmless"])
    assert r.exit_code == 2


def test_the_servers_best_of_ranks_by_the_gated_reward(model_dir, rms):
    from test_serve_engine import job

    from llama2_mlx.serve.engine import Engine
    from llama2_mlx.serve.jobs import Finish
    from llama2_mlx.serve.server import ServeConfig, load_served

    served = load_served(ServeConfig(model=str(model_dir), reward_model=str(rms[0]),
                                     safety_reward_model=str(rms[1])))
    assert served.scorer.gated
    model, tok = served.models[str(model_dir)]
    eng = Engine(served.models, reward_model=served.scorer)
    eng.start()
    try:
        ids = tok.encode_chat(user("spell dog"))
        j, c = job(ids, 6, model=str(model_dir), temp=1.5, seed=3, n=4, best_of=4)
        eng.submit(j)
        c.wait()
    finally:
        eng.stop()
    rewards = [e.reward for e in c.events if isinstance(e, Finish)]
    seqs = [ids + [t for t in c.tokens(i) if t != tok.eos_id] + [tok.eos_id] for i in range(4)]
    want = served.scorer.score_tokens(seqs).rewards
    assert rewards == sorted(rewards, reverse=True)
    np.testing.assert_allclose(rewards, want, atol=1e-5)
    assert all(0.0 < x < 1.0 for x in rewards)  # probabilities, the gate's scale
    with pytest.raises(Exception, match="needs --reward-model"):
        ServeConfig(safety_reward_model=str(rms[1])).check()
