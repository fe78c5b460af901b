"""One base in memory for several models: ``lora.twin`` and ``SharedBase`` (the policy and
a reward model trained on the same base share its arrays; each keeps its own adapters)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model
from mlx.utils import tree_flatten, tree_map
from typer.testing import CliRunner

from cli.app import app
from llama2_mlx.checkpoints.shared import SharedBase
from llama2_mlx.models.lora import (
    LoRAConfig,
    apply_lora,
    fuse_lora,
    save_adapters,
    twin,
)
from llama2_mlx.rlhf.reward import RewardTrainConfig, prepare_reward_model
from llama2_mlx.rlhf.reward_model import (
    load_reward_model,
    save_reward_model,
    score_responses,
)

runner = CliRunner()
X = mx.array([[1, 5, 9, 13, 2]])


def user(text):
    return [{"role": "user", "content": text}]


def nudge(model):
    """Move every trainable weight off its initial value (as training would)."""
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
    mx.eval(model.parameters())


def test_twin_shares_arrays_but_not_adapters_training_or_fusing():
    base = make_model()
    want = np.array(base(X))
    before = mx.get_active_memory()
    t = twin(base)
    apply_lora(t, LoRAConfig(rank=4))
    nudge(t)
    # The twin costs only its LoRA matrices: not another copy of the base.
    lora_bytes = sum(v.nbytes for k, v in tree_flatten(t.parameters()) if "lora_" in k)
    assert mx.get_active_memory() - before < lora_bytes + 64 * 1024
    assert t.model.layers[0].self_attn.q_proj.linear.weight is base.model.layers[0].self_attn.q_proj.weight
    # The base is unchanged: no LoRA layers, nothing frozen, same outputs.
    assert not any("lora_" in k for k, _ in tree_flatten(base.parameters()))
    assert len(tree_flatten(base.trainable_parameters())) == len(tree_flatten(base.parameters()))
    np.testing.assert_array_equal(np.array(base(X)), want)
    assert np.abs(np.array(t(X)) - want).max() > 1e-3  # the twin's adapters act
    fused = np.array(t(X))
    fuse_lora(t)
    np.testing.assert_allclose(np.array(t(X)), fused, atol=1e-4)
    np.testing.assert_array_equal(np.array(base(X)), want)


@pytest.fixture
def lora_rm(tmp_path, model_dir, tok):
    """A LoRA reward model trained (nudged) on ``model_dir``, saved under tmp_path/rm."""
    from llama2_mlx.checkpoints.load import load

    config = RewardTrainConfig(fine_tune_type="lora")
    rm = prepare_reward_model(load(model_dir)[0], config, seed=3)
    nudge(rm)
    return save_reward_model(rm, tmp_path / "rm", base_model=model_dir, lora_config=config.lora)


def test_reward_model_on_the_policys_base_shares_it_and_scores_the_same(lora_rm, model_dir, tmp_path):
    prompts, answers = [user("spell dog"), user("count two")], ["dog", "one two"]
    alone, tok = load_reward_model(lora_rm)
    want = score_responses(alone, tok, prompts, answers)

    base = SharedBase.load(model_dir)
    # A policy with adapters of its own, on the same base.
    policy_adapters = tmp_path / "policy-adapters"
    p = twin(base.model)
    apply_lora(p, LoRAConfig(rank=2))
    nudge(p)
    save_adapters(p, policy_adapters, LoRAConfig(rank=2))
    policy, _ = base.policy(policy_adapters)
    before = mx.get_active_memory()
    rm, tok2 = load_reward_model(lora_rm, shared=base)
    added = mx.get_active_memory() - before
    base_bytes = sum(v.nbytes for _, v in tree_flatten(base.model.parameters()))
    assert base.shared_by(rm) and base.shared_by(policy)
    assert added < 0.25 * base_bytes, (added, base_bytes)
    np.testing.assert_allclose(score_responses(rm, tok2, prompts, answers), want, atol=1e-5)
    # The policy's adapters and the reward model's do not see each other.
    np.testing.assert_allclose(np.array(policy(X)), np.array(p(X)), atol=1e-6)
    # Another dtype or another checkpoint is loaded on its own.
    assert not base.shared_by(load_reward_model(lora_rm, dtype="bfloat16", shared=base)[0])
    other = SharedBase(str(tmp_path), tmp_path, None, make_model(seed=5), tok)
    assert not other.shared_by(load_reward_model(lora_rm, shared=other)[0])


def test_rejection_sample_cli_says_it_shares_the_base(lora_rm, model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "spell dog"}) + "\n")
    r = runner.invoke(app, ["rejection-sample", "--model", str(model_dir), "--reward-model",
                            str(lora_rm), "--prompts", str(prompts), "-k", "2", "--max-tokens", "3",
                            "--out", str(tmp_path / "best.jsonl"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "shares the policy's base weights" in r.stderr
