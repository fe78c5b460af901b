"""One option vocabulary and one set of output conventions for every command: hidden
aliases (older names, mlx-lm's), options named as typed in errors, mlx-lm config keys,
help that is true, and messages on stderr with absolute paths."""

from __future__ import annotations

import json
import re

import pytest
import typer
from conftest import make_model
from typer.testing import CliRunner

from cli.app import app
from cli.common import ALIASES, flag_of, user_text
from llama2_mlx.errors import Llama2Error, OptionError, OptionText
from llama2_mlx.models.lora import LoRAConfig, apply_lora, save_adapters
from llama2_mlx.training.sft import SFTOptions

runner = CliRunner()


def test_option_errors_name_fields_in_the_library_and_flags_at_the_cli():
    e = OptionError("{max_kv_size} {got} must be larger than {keep} kept tokens", got=4, keep=4)
    assert isinstance(e, Llama2Error) and e.option == "max_kv_size"
    assert str(e) == "max_kv_size 4 must be larger than 4 kept tokens"  # the library's words
    assert e.render(lambda f: f"<{f}>") == "<max_kv_size> 4 must be larger than 4 kept tokens"
    # values are never read as placeholders
    e = OptionError("{where}: bad {got!r}", where="{x}", got="{y}")
    assert str(e) == "{x}: bad '{y}'" and e.options == ()
    # outside a command a field is named as its long option
    assert flag_of("max_seq_length") == "--max-seq-length"
    assert user_text(OptionText("give {epochs} or {iters}")) == "give --epochs or --iters"


def test_every_alias_points_at_an_option_of_some_command():
    commands = typer.main.get_command(app).commands
    opts = {name: {o for p in c.params for o in (*getattr(p, "opts", ()),
                                                   *getattr(p, "secondary_opts", ()))}
            for name, c in commands.items()}
    for alias, (canonical, only) in ALIASES.items():
        having = [n for n, o in opts.items() if canonical in o and (only is None or n in only)]
        assert having, alias
        assert not any(alias in o for o in opts.values()), f"{alias} is an option itself"
    # hidden: no help lists an alias
    for name in commands:
        text = runner.invoke(app, [name, "--help"], env={"COLUMNS": "300"}).stdout
        for alias in ALIASES:
            assert f"{alias} " not in text and f"{alias}\n" not in text, (name, alias)


@pytest.mark.parametrize("args, message", [
    # rs-loop checks its options before loading anything
    (["-k", "0"], "error: -k must be at least 1 (got 0)"),
    (["--k", "0"], "error: --k must be at least 1 (got 0)"),
    (["--max-tokens", "0"], "error: --max-tokens must be >= 1, got 0"),
    (["--temp", "-1"], "error: --temp must be >= 0, got -1.0"),
    (["--iters", "0"], "error: --iters must be at least 1 (got 0)"),
    (["--iterations", "0"], "error: --iterations must be at least 1 (got 0)"),
])
def test_errors_name_the_option_as_the_user_typed_it(tmp_path, args, message):
    r = runner.invoke(app, ["rs-loop", "--model", "m", "--reward-model", "rm", "--prompts", "p",
                            "--out", str(tmp_path), *args])
    assert r.exit_code == 2 and r.stderr == message + "\n", r.output


def test_lora_train_takes_mlx_lm_names(tmp_path, model_dir):
    r = runner.invoke(app, ["lora-train", "--model", str(model_dir), "--train", "nope.jsonl",
                            "--learning-rate", "1e-3", "--steps-per-eval", "0"])
    assert r.exit_code == 2 and r.stderr == "error: --train: nope.jsonl not found\n"
    r = runner.invoke(app, ["lora-train", "--iters", "0", "--learning-rate", "1e-3"])
    assert r.exit_code == 2 and r.stderr == "error: --iters must be at least 1 (got 0)\n"


def test_mlx_lm_config_files(tmp_path):
    cfg = tmp_path / "lora_config.yaml"
    cfg.write_text(
        "model: base\ntrain: true\nfine_tune_type: lora\noptimizer: adam\ndata: d\nseed: 0\n"
        "num_layers: 2\nbatch_size: 2\niters: 10\nval_batches: 5\nlearning_rate: 1.0e-4\n"
        "steps_per_report: 5\nsteps_per_eval: 50\nresume_adapter_file: null\n"
        "adapter_path: ad\nsave_every: 20\ntest: false\ntest_batches: 100\n"
        "max_seq_length: 512\ngrad_checkpoint: true\ngrad_accumulation_steps: 2\n"
        "mask_prompt: true\nlr_schedule: null\n"
        "lora_parameters:\n  rank: 4\n  dropout: 0.0\n  scale: 10.0\n  keys: [self_attn.q_proj]\n")
    o = SFTOptions.resolve(config_file=cfg)
    assert (o.model, o.adapter_path, o.data.data, o.data.batch_size) == ("base", "ad", "d", 2)
    assert (o.train.lr, o.train.log_every, o.train.val_every, o.train.grad_accum) == (1e-4, 5, 50, 2)
    assert (o.train.iters, o.train.save_every, o.train.grad_checkpoint, o.data.max_seq_length) == (
        10, 20, True, 512)
    assert o.lora == LoRAConfig(rank=4, dropout=0.0, scale=10.0, keys=("self_attn.q_proj",),
                                num_layers=2)
    for line, message in [
        ("mask_prompt: false", "mask_prompt: false is not what lora-train does (it takes true)"),
        ("fine_tune_type: dora", 'fine_tune_type: "dora" is not what lora-train does'),
        ("lora_parameters: {alpha: 16}", "lora_parameters.alpha is not a LoRA option"),
    ]:
        cfg.write_text(line + "\n")
        with pytest.raises(Llama2Error, match=re.escape(message)):
            SFTOptions.resolve(config_file=cfg)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    model = apply_lora(make_model(), LoRAConfig(rank=2))
    return save_adapters(model, tmp_path_factory.mktemp("ad"), LoRAConfig(rank=2))


def test_fuse_messages_and_mlx_lm_s_save_path(tmp_path, model_dir, adapters, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["fuse", "-m", str(model_dir), "--adapter-path", str(adapters),
                            "--save-path", "fused"])  # mlx-lm's name of --out
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr == f"fused model written to {tmp_path / 'fused'}\n"
    r = runner.invoke(app, ["fuse", "-m", str(model_dir), "--adapter-path", str(adapters),
                            "--out", "g", "--format", "gguf"])
    assert r.exit_code == 0, r.output
    path = r.stderr.strip().rsplit(" ", 1)[1]
    assert path.startswith("/") and path.endswith(".gguf")  # an absolute path


def test_convert_help_is_true_and_messages_go_to_stderr(tmp_path, model_dir, monkeypatch):
    params = {p.name: p for p in typer.main.get_command(app).commands["convert"].params}
    assert "(2, 3, 4, 5, 6 or 8)" in params["q_bits"].help
    assert "(32, 64 or 128)" in params["q_group_size"].help
    monkeypatch.chdir(tmp_path)
    for bits in (2, 3, 5, 6):
        r = runner.invoke(app, ["convert", "--hf-path", str(model_dir), "--mlx-path", f"q{bits}",
                                "-q", "--q-bits", str(bits), "--q-group-size", "32"])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / f"q{bits}" / "config.json").read_text())[
            "quantization"]["bits"] == bits
        assert r.stdout == "" and r.stderr == f"converted model written to {tmp_path / f'q{bits}'}\n"
    r = runner.invoke(app, ["convert", "-m", str(model_dir), "-o", "x", "-q", "--q-bits", "7"])
    assert r.exit_code == 2 and r.stderr == "error: --q-bits 7: use one of 2, 3, 4, 5, 6, 8\n"
