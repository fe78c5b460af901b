"""The BLAS under MLX (llama2_mlx/blas.py): each case runs in a fresh Python, because
the BLAS can only be chosen before mlx is imported (this test process imported it
long ago, in conftest). Where MLX's ``cblas_sgemm`` is bound is read twice: by
``describe()`` (libmlx.so's relocation slot) and by the dynamic linker itself
(``LD_DEBUG=bindings``), so neither check can vouch for itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from llama2_mlx import blas

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
OPENBLAS = blas.find_openblas() if LINUX else None

pytestmark = pytest.mark.skipif(not LINUX, reason="the BLAS choice is for MLX's CPU backend on Linux")
needs_openblas = pytest.mark.skipif(
    OPENBLAS is None, reason=f"no OpenBLAS on this system ({blas.INSTALL_HINT})")

# Prints describe() as JSON on the last stdout line; saves the logits of a small
# random model (fixed seed, made here) to argv[1] when given.
CODE = """
import json, sys
import llama2_mlx
from llama2_mlx import blas
import mlx.core as mx
import numpy as np
from llama2_mlx.models.model import ModelArgs, Transformer

if len(sys.argv) > 1:
    mx.random.seed(0)
    model = Transformer(ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=1000,
                                  multiple_of=64))
    tokens = mx.array(np.random.RandomState(0).randint(0, 1000, (2, 48)))
    np.save(sys.argv[1], np.array(model(tokens)))
else:
    assert (mx.ones((64, 64)) @ mx.ones((64, 64))).sum().item() == 64 ** 3  # MLX still works
print(json.dumps(blas.describe().__dict__))
"""

BINDING = re.compile(r"binding file (\S*libmlx\S*) \[\d+\] to (\S+) \[\d+\]: normal symbol `cblas_sgemm'")


def run(code: str, blas_env: str | None, *args: str, ld_debug: bool = False) -> subprocess.CompletedProcess:
    """``python -c code args`` with this checkout first on the path and LLAMA2_MLX_BLAS
    set to ``blas_env`` (None: unset, the default search)."""
    env = {k: v for k, v in os.environ.items() if k not in (blas.ENV, "LD_DEBUG", "LD_PRELOAD")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if blas_env is not None:
        env[blas.ENV] = blas_env
    if ld_debug:
        env["LD_DEBUG"] = "bindings"  # the dynamic linker reports each symbol it binds (stderr)
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def info_of(r: subprocess.CompletedProcess) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


def warnings_of(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


def bound_by_linker(r: subprocess.CompletedProcess) -> str:
    """The file the dynamic linker bound libmlx.so's cblas_sgemm to (from LD_DEBUG)."""
    targets = {m.group(2) for m in BINDING.finditer(r.stderr)}
    assert len(targets) == 1, f"LD_DEBUG bindings of cblas_sgemm: {targets}"
    return os.path.realpath(targets.pop())


@pytest.fixture(scope="module")
def off_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("blas") / "off.npy"
    return run(CODE, "off", str(path), ld_debug=True), path


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("blas") / "default.npy"
    return run(CODE, None, str(path), ld_debug=True), path


def test_off_keeps_the_reference_blas_bundled_with_mlx(off_run):
    r, _ = off_run
    info = info_of(r)
    assert info["name"] == blas.REFERENCE and info["verified"], info
    assert info["note"] == "LLAMA2_MLX_BLAS=off"
    assert bound_by_linker(r) == os.path.realpath(info["path"])


@needs_openblas
def test_default_loads_openblas_and_mlx_sgemm_is_bound_to_it(off_run, default_run):
    info, off = info_of(default_run[0]), info_of(off_run[0])
    assert info["verified"] and info["name"] != blas.REFERENCE, info
    assert info["note"] == "found by search"
    # The linker's own account agrees with describe(), and it is not the bundled library.
    assert bound_by_linker(default_run[0]) == os.path.realpath(info["path"])
    assert os.path.realpath(info["path"]) != os.path.realpath(off["path"])


@needs_openblas
def test_logits_agree_with_the_reference_blas(off_run, default_run):
    ref, new = np.load(off_run[1]), np.load(default_run[1])
    assert ref.shape == (2, 48, 1000) and np.abs(ref).max() > 0
    np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_no_openblas_found_keeps_the_reference_silently():
    # blas.py imports nothing from the package: load it alone, with an empty search.
    code = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("blas_alone", {str(ROOT / "llama2_mlx" / "blas.py")!r})
blas = sys.modules["blas_alone"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blas)
blas._candidates = lambda: iter(())
assert blas.setup() is None
import mlx.core
print(json.dumps(blas.describe().__dict__))
"""
    r = run(code, None)
    info = info_of(r)
    assert info["name"] == blas.REFERENCE and info["verified"], info
    assert info["note"].startswith("no OpenBLAS found") and warnings_of(r) == []


@pytest.mark.parametrize("bad", ["missing", "not-a-library", "no-cblas"])
def test_explicit_bad_path_is_one_warning_line_and_mlx_still_works(tmp_path, bad):
    path = {"missing": str(tmp_path / "nope" / "libopenblas.so.0"),
            "not-a-library": str(tmp_path / "libfake.so"),
            "no-cblas": "libm.so.6"}[bad]  # a library, but not a BLAS
    (tmp_path / "libfake.so").write_text("not a shared object\n")
    r = run(CODE, path)
    lines = warnings_of(r)
    assert len(lines) == 1 and lines[0].startswith("llama2-mlx: warning: LLAMA2_MLX_BLAS"), lines
    assert path in lines[0] and "Traceback" not in r.stderr
    info = info_of(r)
    assert info["name"] == blas.REFERENCE and info["verified"], info


def test_cli_warns_once_for_a_bad_path(tmp_path):
    # cli/app.py calls setup() again after llama2_mlx/__init__.py did: still one line.
    r = run("from cli.app import main; main()", str(tmp_path / "missing.so"), "env")
    assert len(warnings_of(r)) == 1, r.stderr
    assert f"BLAS:       {blas.REFERENCE}" in r.stdout


def test_mlx_imported_first_is_too_late():
    code = "import mlx.core\n" + CODE
    quiet = run(code, None)  # the default search: said by describe(), no warning
    asked = run(code, "/usr/lib/libopenblas.so.0")  # an explicit request: one warning line
    for r in (quiet, asked):
        info = info_of(r)
        assert info["name"] == blas.REFERENCE and info["verified"], info
        assert info["note"].startswith("too late: mlx.core was imported before llama2_mlx"), info
    assert warnings_of(quiet) == []
    lines = warnings_of(asked)
    assert len(lines) == 1 and "too late" in lines[0], lines


def test_describe_in_this_process_is_checked_and_one_line():
    info = blas.describe()
    assert info.verified and info.path and "\n" not in str(info)


def test_env_command_and_version_show_the_blas():
    runner = CliRunner()
    r = runner.invoke(app, ["env"])
    assert r.exit_code == 0, r.output
    keys = [line.split(":")[0] for line in r.stdout.splitlines()]
    assert keys == ["llama2-mlx", "python", "mlx", "device", "BLAS"]
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("llama2-mlx ") and "BLAS: " in r.stdout
