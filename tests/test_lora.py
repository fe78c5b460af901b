"""LoRA layers, adapter files interchangeable with mlx-lm, QLoRA, gradient checkpointing."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_model
from mlx.utils import tree_flatten

from llama2_mlx.errors import Llama2Error
from llama2_mlx.models.lora import (
    DEFAULT_KEYS,
    LoRAConfig,
    LoRALinear,
    adapter_weights,
    apply_lora,
    fuse_lora,
    load_adapters,
    lora_layers,
    save_adapters,
)

TOKENS = mx.array(np.random.RandomState(0).randint(3, 500, (2, 12)))


def randomize_b(model, seed=1, std=0.05):
    mx.random.seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_b = std * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())


def mlx_lm_model(ours):
    """mlx-lm's own Llama with our model's weights (the names are the same)."""
    from mlx_lm.models import llama

    theirs = llama.Model(llama.ModelArgs.from_dict(ours.args.to_hf_config()))
    theirs.load_weights(list(tree_flatten(ours.parameters())))
    mx.eval(theirs.parameters())
    return theirs


def test_lora_starts_unchanged_and_only_lora_is_trainable():
    base = make_model()
    ref = base(TOKENS)
    model = apply_lora(make_model(), LoRAConfig(rank=4, num_layers=1))
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(ref))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.startswith("model.layers.1.") for k in trainable)
    assert {k.rsplit(".", 1)[-1] for k in trainable} == {"lora_a", "lora_b"}
    assert len(trainable) == 2 * len(DEFAULT_KEYS)
    a = model.args
    assert trainable["model.layers.1.self_attn.q_proj.lora_a"].shape == (a.dim, 4)
    assert trainable["model.layers.1.self_attn.k_proj.lora_b"].shape == (4, a.n_kv_heads * a.head_dim)
    assert trainable["model.layers.1.mlp.down_proj.lora_a"].shape == (a.hidden_dim, 4)
    assert not mx.any(trainable["model.layers.1.mlp.up_proj.lora_b"]).item()


def test_lora_forward_is_w_plus_scaled_low_rank_update():
    lin = nn.Linear(8, 6, bias=False)
    layer = LoRALinear(lin, rank=2, scale=3.0)
    layer.lora_b = mx.random.normal((2, 6))
    x = mx.random.normal((5, 8))
    want = x @ (lin.weight + 3.0 * (layer.lora_a @ layer.lora_b).T).T
    np.testing.assert_allclose(np.array(layer(x)), np.array(want), atol=1e-5)
    np.testing.assert_allclose(np.array(layer.delta()), np.array(3.0 * (layer.lora_a @ layer.lora_b).T), atol=1e-6)


def test_bad_keys_and_layers_are_one_line_errors():
    with pytest.raises(Llama2Error, match="keys: no module 'self_attn.x_proj'"):
        apply_lora(make_model(), LoRAConfig(keys=("self_attn.x_proj",)))
    with pytest.raises(Llama2Error, match="num_layers 5: the model has only 2 layers"):
        apply_lora(make_model(), LoRAConfig(num_layers=5))


def test_mlx_lm_loads_our_adapters(tmp_path):
    from mlx_lm.tuner.utils import load_adapters as mlx_load_adapters

    cfg = LoRAConfig(rank=4, scale=10.0, keys=("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"), num_layers=1)
    ours = apply_lora(make_model(), cfg)
    randomize_b(ours)
    save_adapters(ours, tmp_path, cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "lora" and saved["num_layers"] == 1
    assert saved["lora_parameters"] == {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": list(cfg.keys)}
    theirs = mlx_lm_model(make_model())
    mlx_load_adapters(theirs, str(tmp_path))
    np.testing.assert_allclose(np.array(theirs(TOKENS)), np.array(ours(TOKENS)), atol=1e-5)
    assert not np.allclose(np.array(ours(TOKENS)), np.array(make_model()(TOKENS)), atol=1e-3)


def test_we_load_adapters_written_by_mlx_lm_training(tmp_path):
    """mlx-lm's own trainer and config writer (as `mlx_lm lora` does), then our loader."""
    import types

    import mlx.optimizers as optim
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    args = types.SimpleNamespace(**{**CONFIG_DEFAULTS, "num_layers": 2, "adapter_path": str(tmp_path),
                                    "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 20.0}})
    theirs = mlx_lm_model(make_model())
    theirs.freeze()
    linear_to_lora_layers(theirs, args.num_layers, args.lora_parameters)
    save_config(vars(args), tmp_path / "adapter_config.json")
    rng = np.random.RandomState(0)
    data = [(rng.randint(3, 500, 20).tolist(), 5) for _ in range(4)]
    train(theirs, optim.Adam(learning_rate=1e-2), data, None,
          TrainingArgs(batch_size=2, iters=2, adapter_file=str(tmp_path / "adapters.safetensors"),
                       steps_per_report=100, steps_per_save=100))
    ours = load_adapters(make_model(), tmp_path)
    assert len(lora_layers(ours)) == 2 * len(DEFAULT_KEYS)
    theirs.eval()
    np.testing.assert_allclose(np.array(ours(TOKENS)), np.array(theirs(TOKENS)), atol=1e-5)
    assert not np.allclose(np.array(ours(TOKENS)), np.array(make_model()(TOKENS)), atol=1e-4)


def test_adapter_file_errors_name_the_tensor(tmp_path):
    cfg = LoRAConfig(rank=4)
    save_adapters(apply_lora(make_model(), cfg), tmp_path, cfg)
    with pytest.raises(Llama2Error, match=r"lora_a has shape \(64, 4\), the model expects \(64, 8\)"):
        cfg8 = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg8["lora_parameters"]["rank"] = 8
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg8))
        load_adapters(make_model(), tmp_path)
    with pytest.raises(Llama2Error, match="adapter_config.json not found"):
        load_adapters(make_model(), tmp_path / "nowhere")


def test_qlora_wraps_quantized_layers_and_trains():
    from llama2_mlx.checkpoints.export import quantize

    model = make_model()
    quantize(model, bits=4, group_size=32)
    ref = model(TOKENS)
    apply_lora(model, LoRAConfig(rank=4))
    layer = dict(lora_layers(model))["model.layers.0.mlp.down_proj"]
    assert isinstance(layer.linear, nn.QuantizedLinear)
    assert layer.lora_a.shape == (model.args.hidden_dim, 4)
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(ref))

    def loss(m, x):
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss)(model, TOKENS)
    flat = dict(tree_flatten(grads))
    assert set(flat) == set(adapter_weights(model))
    assert mx.abs(flat["model.layers.0.mlp.down_proj.lora_b"]).sum().item() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    model = apply_lora(make_model(), LoRAConfig(rank=4, dropout=0.0))
    randomize_b(model)
    T = TOKENS.shape[1] - 1
    seg = mx.array([0] * 5 + [1] * (T - 5))
    mask = ((seg[:, None] == seg[None]) & mx.tril(mx.ones((T, T), mx.bool_)))[None, None]

    def loss(m, x, mask):
        return nn.losses.cross_entropy(m(x[:, :-1], mask=mask), x[:, 1:]).mean()

    for msk in (None, mask):
        grads = []
        for on in (False, True):
            model.model.checkpoint_blocks = on
            _, g = nn.value_and_grad(model, loss)(model, TOKENS, msk)
            grads.append(dict(tree_flatten(g)))
        model.model.checkpoint_blocks = False
        assert set(grads[0]) == set(grads[1])
        for k in grads[0]:
            np.testing.assert_allclose(np.array(grads[1][k]), np.array(grads[0][k]), atol=1e-6, err_msg=k)
        assert mx.abs(grads[1]["model.layers.0.self_attn.q_proj.lora_a"]).sum().item() > 0


def test_fuse_lora_merges_the_update():
    model = apply_lora(make_model(), LoRAConfig(rank=4))
    randomize_b(model)
    want = model(TOKENS)
    fuse_lora(model)
    assert not lora_layers(model)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)
    np.testing.assert_allclose(np.array(model(TOKENS)), np.array(want), atol=1e-4)


def test_bad_adapter_files_are_one_line_errors(tmp_path):
    from conftest import make_model

    from llama2_mlx.errors import Llama2Error
    from llama2_mlx.models.lora import load_adapters, read_adapter_config

    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(Llama2Error, match="adapter_config.json: expected a JSON object"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 2, "scale": 1.0}}))
    (tmp_path / "adapters.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{}")
    with pytest.raises(Llama2Error, match="adapters.safetensors: truncated or corrupt"):
        load_adapters(make_model(), tmp_path)


def test_disabled_adapters_compute_the_base_alone_and_come_back_on_exit():
    from llama2_mlx.models.lora import disabled_adapters, twin

    base = make_model()
    ref = np.array(base(TOKENS))
    model = apply_lora(twin(base), LoRAConfig(rank=4))
    for _, layer in lora_layers(model):  # a trained update: the policy differs from its base
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    adapted = np.array(model(TOKENS))
    assert np.abs(adapted - ref).max() > 1e-2
    with disabled_adapters(model) as m:
        assert m is model
        np.testing.assert_array_equal(np.array(model(TOKENS)), ref)
        assert set(adapter_weights(model)) and all(mx.any(layer.lora_b).item()
                                                    for _, layer in lora_layers(model))
    np.testing.assert_array_equal(np.array(model(TOKENS)), adapted)
    with pytest.raises(RuntimeError):  # enabled again however the block ends
        with disabled_adapters(model):
            raise RuntimeError("boom")
    np.testing.assert_array_equal(np.array(model(TOKENS)), adapted)
    # The flag is the twin's own: a second policy on the same base is not switched off.
    other = twin(model)
    with disabled_adapters(model):
        np.testing.assert_array_equal(np.array(other(TOKENS)), adapted)
    assert "enabled" not in dict(tree_flatten(model.parameters()))
