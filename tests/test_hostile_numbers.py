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
