"""Options and their defaults are written once, in the library's dataclass fields.

The training commands' options are made from those fields (``cli.options.field_option``):
their help is the field's and the default they show is the library's, which applies
when they are not given. A ``lora-train`` config file maps onto the composed
``SFTOptions`` (``lora``, ``train``, ``data``) by option name.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer

from cli.app import app
from cli.options import shown
from llama2_mlx.errors import Llama2Error
from llama2_mlx.generation.generate import GenerationConfig
from llama2_mlx.models.lora import LoRAConfig
from llama2_mlx.rlhf.ppo import PPOConfig
from llama2_mlx.rlhf.rejection import RSConfig
from llama2_mlx.rlhf.reward import RewardTrainConfig
from llama2_mlx.rlhf.rs_loop import RSLoopConfig
from llama2_mlx.training.sft import OPTION_PARTS, DataConfig, SFTOptions
from llama2_mlx.training.trainer import TrainConfig

SAMPLING = {"max_tokens", "temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
            "stop", "max_kv_size"}
# Command -> the defaults it runs with (searched in order), its options named like one of
# their fields that are something else, and the options that must be found among them.
COMMANDS = {
    "lora-train": ((SFTOptions.resolve(),), set(), set(OPTION_PARTS)),
    # The paper's learning rate depends on --fine-tune-type (paper_train_config).
    "reward-train": ((RewardTrainConfig(),), {"lr"}, {"max_seq_len", "eval_every", "progress"}),
    # The policy's adapters (not the fine-tunes' output) and the loop's own --resume and
    # --overwrite; its one seed is the fine-tunes' (sampling uses it too).
    "rs-loop": ((RSLoopConfig().sft, RSConfig()), {"adapter_path", "resume", "overwrite"},
                {"k", "temp", "top_p", "top_k", "max_tokens", "lr", "progress"}),
    "rejection-sample": ((RSConfig(),), set(), {"k", "temp", "top_p", "top_k", "max_tokens",
                                                "seed"}),
    # The paper's PPO settings (the llama2-ppo preset); the policy's adapters are not its own.
    "ppo": ((PPOConfig(),), {"adapter_path"}, {"iterations", "batch_size", "minibatch_size", "k",
                                               "beta", "ppo_clip", "lr", "weight_decay",
                                               "grad_clip", "temp", "max_tokens", "rank",
                                               "seed", "kl_stop", "patience"}),
    "generate": ((GenerationConfig(),), set(), SAMPLING),
    # chat's answers may be longer; its stop strings are the chat tags.
    "chat": ((GenerationConfig(max_tokens=512),), set(), SAMPLING - {"stop"}),
}


def option_field(defaults, name):
    """(instance, field) of the option ``name`` in ``defaults`` or its dataclass parts."""
    parts = [defaults] + [getattr(defaults, f.name) for f in dataclasses.fields(defaults)
                          if dataclasses.is_dataclass(getattr(defaults, f.name))]
    for part in parts:
        for f in dataclasses.fields(part):
            if f.name == name and "help" in f.metadata:
                return part, f
    return None


@pytest.mark.parametrize("command", COMMANDS)
def test_the_cli_shows_the_dataclass_fields_help_and_defaults(command):
    defaults, others, required = COMMANDS[command]
    checked = set()
    for p in typer.main.get_command(app).commands[command].params:
        found = next(filter(None, (option_field(d, p.name) for d in defaults)), None)
        if found is None or p.name in others:
            continue
        part, f = found
        assert p.default is None, (command, p.name)  # the library's default applies
        assert p.help == f.metadata["help"], (command, p.name)
        show = p.show_default if isinstance(p.show_default, str) else None
        assert show == shown(getattr(part, p.name)), (command, p.name)
        checked.add(p.name)
    assert required <= checked, (command, required - checked)
    if command == "lora-train":
        assert checked == set(OPTION_PARTS)  # every lora-train option is one of SFTOptions'


def test_the_cli_shows_chat_s_own_max_tokens_default():
    params = {p.name: p for p in typer.main.get_command(app).commands["chat"].params}
    assert params["max_tokens"].show_default == "512"
    params = {p.name: p for p in typer.main.get_command(app).commands["rejection-sample"].params}
    assert (params["temp"].show_default, params["seed"].show_default) == ("1.0", "0")


def test_the_composed_defaults_are_their_parts_defaults():
    assert SFTOptions.resolve() == SFTOptions(lora=LoRAConfig(), train=TrainConfig(), data=DataConfig())
    assert RSLoopConfig().sft == SFTOptions.resolve({"lr": 1e-4})  # rs-loop: only lr differs


def test_config_file_keys_map_onto_the_composed_options(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        "model: base\nadapter-path: out\ndtype: float16\n"          # SFTOptions
        "rank: 4\nkeys: attn\nnum_layers: 1\n"                       # LoRAConfig
        "lr: 3.0e-4\nweight-decay: 0\niters: 7\nseed: 3\nprogress: false\n"  # TrainConfig
        "effective_batch: 8\n"                                       # -> grad_accum
        "data: d\ntrain: t.jsonl\nbatch-size: 2\nmax_seq_length: 128\npack: no\n")  # DataConfig
    o = SFTOptions.resolve(config_file=cfg)
    assert o == SFTOptions(
        model="base", adapter_path="out", dtype="float16",
        lora=LoRAConfig(rank=4, keys=("attn",), num_layers=1),
        train=TrainConfig(lr=3e-4, weight_decay=0.0, iters=7, seed=3, progress=False, grad_accum=4),
        data=DataConfig(data="d", train="t.jsonl", batch_size=2, max_seq_length=128, pack=False),
    )
    assert o.lora.keys == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    # settings() gives the options back by name: a config file of the same run.
    settings = o.settings()
    assert (settings["train"], settings["rank"], settings["grad_accum"]) == ("t.jsonl", 4, 4)
    (tmp_path / "again.json").write_text(json.dumps(settings))
    assert SFTOptions.resolve(config_file=tmp_path / "again.json") == o
    assert o.with_options(train="u.jsonl", seed=4) == dataclasses.replace(
        o, train=dataclasses.replace(o.train, seed=4), data=dataclasses.replace(o.data, train="u.jsonl"))
    # The keys a config file takes: the options' (no other field of the parts).
    assert set(OPTION_PARTS) == {
        "model", "dtype", "adapter_path", "rank", "scale", "dropout", "keys", "num_layers",
        "lr", "warmup", "min_lr_ratio", "weight_decay", "clip", "grad_accum", "epochs", "iters",
        "val_every", "val_batches", "save_every", "resume", "overwrite", "grad_checkpoint", "seed", "progress",
        "log_every", "data", "train", "valid", "test", "batch_size", "max_seq_length", "pack", "long_samples",
    }
    cfg.write_text("schedule: linear\n")  # a TrainConfig field, not an option
    with pytest.raises(Llama2Error, match=r"sft.yaml: unknown option 'schedule'"):
        SFTOptions.resolve(config_file=cfg)
    cfg.write_text("max-seq-length: long\n")
    with pytest.raises(Llama2Error, match=r"sft.yaml: option max_seq_length = 'long' is not a int"):
        SFTOptions.resolve(config_file=cfg)
