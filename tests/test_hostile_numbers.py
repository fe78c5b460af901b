"""Non-finite numbers and file permissions (issue 10, classes 5 and 6).

Every float option of every command is found by walking the Typer app (so a new option
is covered without editing this file); each is given NaN and an infinity and must end
in one ``error:`` line naming the flag, exit 2, before any work. A config file with
YAML's ``.nan`` is refused naming its key. What the atomic writers write gets the
umask's permissions, like any other tool's files.
"""

from __future__ import annotations

import os
import stat

import pytest
import typer
from typer.testing import CliRunner

from cli.app import app
from cli.common import takes_float
from llama2_mlx.io.atomic import atomic_dir, write_json_atomic

COMMAND = typer.main.get_command(app)


def _float_options():
    for name, cmd in sorted(COMMAND.commands.items()):
        subs = sorted(cmd.commands.items()) if hasattr(cmd, "commands") else [(None, cmd)]
        for sub, c in subs:
            for p in c.params:
                if p.opts and p.opts[0].startswith("-") and takes_float(p):
                    longs = [o for o in p.opts if o.startswith("--")]
                    yield [name] + ([sub] if sub else []), longs[0]


FLOAT_OPTIONS = list(_float_options())


def test_the_walk_finds_the_float_options():
    flags = {flag for _, flag in FLOAT_OPTIONS}
    assert {"--lr", "--epochs", "--temp", "--top-p"} <= flags
    assert len(FLOAT_OPTIONS) >= 15


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("command,flag", FLOAT_OPTIONS, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_a_non_finite_number_is_refused_naming_the_option(command, flag, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, f"{flag}={value}"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {flag} must be a finite number (got {float(value)})"], result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_a_config_with_nan_is_refused_naming_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: .nan\nlora_parameters:\n  scale: .inf\n")
    result = CliRunner().invoke(app, ["lora-train", "-m", "x", "--train", "t.jsonl",
                                      "--adapter-path", str(tmp_path / "out"), "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(cfg) in errors[0] and "finite" in errors[0], result.output
    assert "learning_rate" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        # the module read the umask once at import: follow the process's current one
        import llama2_mlx.io.atomic as atomic

        saved, atomic._UMASK = atomic._UMASK, umask
        try:
            write_json_atomic(tmp_path / "a.json", {"x": 1})
            with atomic_dir(tmp_path / "d") as d:
                (d / "f").write_text("x")
        finally:
            atomic._UMASK = saved
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask


# --------------------------------------------------------------------------- ranges


def _ranged_options():
    from cli.common import OPTION_RANGES

    for name, cmd in sorted(COMMAND.commands.items()):
        subs = sorted(cmd.commands.items()) if hasattr(cmd, "commands") else [(None, cmd)]
        for sub, c in subs:
            for p in c.params:
                if p.opts and p.opts[0].startswith("-") and p.name in OPTION_RANGES:
                    longs = [o for o in p.opts if o.startswith("--")] or p.opts
                    yield [name] + ([sub] if sub else []), longs[0], OPTION_RANGES[p.name]


def _outside(bounds: dict) -> list:
    """Values just outside ``bounds`` (each side it has)."""
    out = []
    if "min" in bounds:
        out.append(bounds["min"] - 1)
    if "max" in bounds:
        out.append(bounds["max"] + 1)
    if "above" in bounds:
        out.append(bounds["above"])
    if "below" in bounds:
        out.append(bounds["below"])
    return out


RANGED = [(c, f, v) for c, f, b in _ranged_options() for v in _outside(b)]


def test_the_walk_finds_the_ranged_options():
    flags = {flag for _, flag, _ in RANGED}
    assert {"--seed", "--batch-size", "--iterations", "--n", "-k", "--level"} <= flags
    assert len(RANGED) >= 30


@pytest.mark.parametrize("command,flag,value", RANGED,
                         ids=lambda x: x if isinstance(x, str) else " ".join(map(str, x))
                         if isinstance(x, list) else str(x))
def test_an_option_out_of_its_range_is_refused_naming_it(command, flag, value, tmp_path,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, f"{flag}={value}"] if flag.startswith("--")
                                else [*command, flag, str(value)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {flag} must be "), result.output
    assert any(f"(got {v})" in errors[0] for v in (value, float(value))), errors[0]
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # refused before any work


def _ranged_fields():
    import dataclasses

    from llama2_mlx.errors import RANGE_KEYS
    from llama2_mlx.generation.generate import GenerationConfig
    from llama2_mlx.models.lora import LoRAConfig
    from llama2_mlx.rlhf.rejection import RSConfig
    from llama2_mlx.rlhf.reward import RewardTrainConfig
    from llama2_mlx.training.sft import DataConfig
    from llama2_mlx.training.trainer import TrainConfig

    for cls in (TrainConfig, GenerationConfig, LoRAConfig, DataConfig, RewardTrainConfig,
                RSConfig):
        for f in dataclasses.fields(cls):
            bounds = {k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata}
            for value in _outside(bounds):
                yield cls, f.name, value


@pytest.mark.parametrize("cls,name,value", list(_ranged_fields()),
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_the_library_checks_each_fields_range(cls, name, value):
    """``TrainConfig(lr=-1)`` and the like: the library's callers get the same checks."""
    from llama2_mlx.errors import OptionError

    with pytest.raises(OptionError) as e:
        obj = cls(**{name: value})
        getattr(obj, "check", lambda: None)()
    assert e.value.option == name
    assert any(f"(got {v})" in str(e.value) for v in (value, float(value))), str(e.value)


def test_the_seed_is_refused_beyond_32_bits_before_the_data_is_read(tmp_path):
    result = CliRunner().invoke(app, ["lora-train", "-m", "x", "--train", "t.jsonl",
                                      "--seed", str(2**32)])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --seed must be in [0, 4294967295] (got 4294967296)"
