"""The loader (and its export / hub modules): the safe .pth reader, one-line errors,
dtypes, quantized convert, mlx-lm compatibility, hub resolution (mocked) and
``llama2 convert``."""

from __future__ import annotations

import json
import os
import pickle
import types
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY, make_model
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from llama2_mlx.checkpoints.export import convert, save_model
from llama2_mlx.checkpoints.load import load, load_model
from llama2_mlx.errors import Llama2Error
from llama2_mlx.formats.pth import load_pth
from llama2_mlx.formats.weights import hf_to_meta_rows, meta_to_hf_rows, weight_table
from llama2_mlx.io.hub import HUB_PATTERNS

TOKENS = mx.array(np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 11)))


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))


def one_line_error(fn, *names) -> str:
    """Run ``fn``; it must raise a single-line Llama2Error mentioning each of ``names``."""
    with pytest.raises(Llama2Error) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in names:
        assert str(n) in msg, f"{n!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def tiny():
    return make_model(seed=1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny, spm_path):
    return save_model(tiny, tmp_path_factory.mktemp("hf") / "tiny", spm_path)


def write_hf(folder: Path, weights: dict, config: dict, spm_path=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    if spm_path is not None:
        (folder / "tokenizer.model").write_bytes(Path(spm_path).read_bytes())
    return folder


# ----------------------------------------------------------------------------- safe .pth


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_style_zip(path: Path, obj) -> None:
    """A zip laid out as torch.save writes it, with ``obj`` as data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("consolidated/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("consolidated/byteorder", "little")
        z.writestr("consolidated/version", "3\n")


@pytest.mark.parametrize("packing", ["torch-zip", "plain-pickle"])
def test_hostile_pth_is_refused_without_running_it(tmp_path, packing):
    marker = tmp_path / "pwned"
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({**TINY, "vocab_size": -1}))
    shard = folder / "consolidated.00.pth"
    payload = {"tok_embeddings.weight": Evil(marker)}
    if packing == "torch-zip":
        _torch_style_zip(shard, payload)
    else:
        shard.write_bytes(pickle.dumps(payload))
    msg = one_line_error(lambda: load_model(folder), shard, "os.system", "refusing")
    assert "only tensor data" in msg
    assert not marker.exists()


def test_pickle_cannot_alter_the_readers_objects(tmp_path):
    # GLOBAL torch.FloatStorage, then BUILD {"np_dtype": "O"} on it: refused, not applied.
    data = (b"\x80\x02}X\x01\x00\x00\x00actorch\nFloatStorage\n}X\x08\x00\x00\x00np_dtype"
            b"X\x01\x00\x00\x00Osbs.")
    with zipfile.ZipFile(tmp_path / "b.pth", "w") as z:
        z.writestr("b/data.pkl", data)
    one_line_error(lambda: load_pth(tmp_path / "b.pth"), "b.pth", "refusing")


def test_loading_a_meta_checkpoint_never_imports_torch(tmp_path):
    pytest.importorskip("torch")
    import subprocess
    import sys

    from test_parity import write_meta

    folder = write_meta(make_model(), tmp_path / "meta")
    code = ("import sys; from llama2_mlx.checkpoints.load import load_model; "
            f"load_model({str(folder)!r}); assert 'torch' not in sys.modules")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_pth_reader_dtypes_offsets_strides(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32)
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "fp16": torch.randn(4).half(),
        "offset": torch.arange(24.0)[5:11].view(2, 3),  # storage offset into a storage
        "transposed": base.view(4, 6).t(),          # non-contiguous strides
        "param": torch.nn.Parameter(torch.ones(2)),
        "int": torch.tensor([1, -2, 3]),
    }
    torch.save(tensors, tmp_path / "x.pth")
    out = load_pth(tmp_path / "x.pth")
    assert out["bf16"].dtype == mx.bfloat16 and out["fp16"].dtype == mx.float16
    for k, t in tensors.items():
        assert out[k].shape == tuple(t.shape), k
        np.testing.assert_array_equal(np.array(out[k].astype(mx.float32)),
                                      t.detach().float().numpy(), err_msg=k)


def test_truncated_or_garbage_pth_is_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(64, 64)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    one_line_error(lambda: load_pth(tmp_path / "cut.pth"), "cut.pth", "truncated")
    (tmp_path / "junk.pth").write_bytes(b"hello, not a checkpoint")
    one_line_error(lambda: load_pth(tmp_path / "junk.pth"), "junk.pth")


def test_bf16_meta_shard_loads_as_bf16(tmp_path, spm_path):
    torch = pytest.importorskip("torch")
    from test_parity import write_meta

    model = make_model(seed=2, dtype=mx.bfloat16)
    folder = write_meta(model, tmp_path / "meta", 2, torch_dtype=torch.bfloat16)
    loaded = load_model(folder)
    ours, want = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(model.parameters()))
    assert all(v.dtype == mx.bfloat16 for v in ours.values())
    assert all(mx.array_equal(ours[k], want[k]).item() for k in want)
    assert load_model(folder, dtype="float32").lm_head.weight.dtype == mx.float32
    # A Meta folder without tokenizer.model: the model loads, load() says what is missing.
    one_line_error(lambda: load(folder), "tokenizer.model")


def test_public_api_names_the_defining_modules():
    import llama2_mlx
    from llama2_mlx.checkpoints import export
    from llama2_mlx.checkpoints import load as loader

    for name in ("save_model", "quantize", "convert"):
        assert getattr(llama2_mlx, name) is getattr(export, name), name
    assert llama2_mlx.load is loader.load and llama2_mlx.load_model is loader.load_model
    for name in llama2_mlx.__all__:
        assert getattr(llama2_mlx, name) is not None, name


def test_permutation_is_inverted_and_table_is_complete(tiny):
    w = np.arange(32 * 3).reshape(32, 3)
    np.testing.assert_array_equal(meta_to_hf_rows(hf_to_meta_rows(w, 4), 4), w)
    names = {w.internal for w in weight_table(tiny.args.n_layers)}
    assert names == {k for k, _ in tree_flatten(tiny.parameters())}


def test_meta_errors_name_the_shard_and_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    from test_parity import write_meta

    folder = write_meta(make_model(), tmp_path / "meta", 2)
    shard = folder / "consolidated.01.pth"
    sd = {k: v for k, v in load_pth(shard).items()}
    sd = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    del sd["layers.1.feed_forward.w2.weight"]
    torch.save(sd, shard)
    one_line_error(lambda: load_model(folder), shard, "layers.1.feed_forward.w2.weight", "missing")
    sd["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 7)
    torch.save(sd, shard)
    one_line_error(lambda: load_model(folder), shard, "layers.1.feed_forward.w2.weight", "(64, 7)")


# ----------------------------------------------------------------------------- HF errors


def test_hf_missing_unexpected_and_misshapen_tensors(tmp_path, tiny):
    config = tiny.args.to_hf_config()
    good = dict(tree_flatten(tiny.parameters()))
    name = "model.layers.1.self_attn.k_proj.weight"

    missing = {k: v for k, v in good.items() if k != name}
    f = write_hf(tmp_path / "missing", missing, config)
    one_line_error(lambda: load_model(f), f / "model.safetensors", name, "missing")

    extra = {**good, "model.layers.0.self_attn.k_proj.bias": mx.zeros(32)}
    f = write_hf(tmp_path / "extra", extra, config)
    one_line_error(lambda: load_model(f), f / "model.safetensors",
                   "model.layers.0.self_attn.k_proj.bias", "unexpected")

    bad = {**good, name: mx.zeros((16, 64))}
    f = write_hf(tmp_path / "shape", bad, config)
    one_line_error(lambda: load_model(f), f / "model.safetensors", name, "(16, 64)", "(32, 64)")

    # transformers' rotary buffers are ignored.
    f = write_hf(tmp_path / "rotary", {**good, "model.layers.0.self_attn.rotary_emb.inv_freq":
                                       mx.ones(8)}, config)
    load_model(f)


def test_truncated_safetensors_names_file_and_tensor(tmp_path, hf_dir):
    f = tmp_path / "cut"
    f.mkdir()
    (f / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    data = (hf_dir / "model.safetensors").read_bytes()
    (f / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    msg = one_line_error(lambda: load_model(f), f / "model.safetensors", "truncated")
    assert "tensor model." in msg or "tensor lm_head" in msg


def test_tokenizer_size_mismatch(tmp_path, spm_path):
    # More pieces than embedding rows: ids would index out of range, refused.
    model = make_model(vocab_size=500)
    folder = save_model(model, tmp_path / "v500", spm_path)
    one_line_error(lambda: load(folder), "tokenizer.model", "512", "500",
                   "model.embed_tokens.weight", folder / "model.safetensors")


@pytest.mark.parametrize("rows", [513, 576])  # an added token; a vocab padded to a multiple
def test_embedding_larger_than_tokenizer_loads(tmp_path, spm_path, rows):
    model = make_model(seed=3, vocab_size=rows)
    folder = save_model(model, tmp_path / f"v{rows}", spm_path)
    loaded, tok = load(folder)
    assert tok.vocab_size == 512 and loaded.args.vocab_size == rows
    assert loaded.model.embed_tokens.weight.shape == (rows, TINY["dim"])
    np.testing.assert_array_equal(logits(loaded), logits(model))


def test_sharded_hf_folder_with_index(tmp_path, tiny, spm_path, monkeypatch):
    import llama2_mlx.checkpoints.export as export

    monkeypatch.setattr(export, "MAX_SHARD_BYTES", 200_000)
    folder = save_model(tiny, tmp_path / "sharded", spm_path)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (folder / "model.safetensors.index.json").is_file()
    np.testing.assert_array_equal(logits(load(folder)[0]), logits(tiny))
    os.remove(folder / files[-1])
    one_line_error(lambda: load_model(folder), "model.safetensors.index.json", files[-1])


def test_dtype_option(hf_dir):
    assert load_model(hf_dir).lm_head.weight.dtype == mx.float32
    m = load_model(hf_dir, dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(m.parameters())} == {mx.bfloat16}
    one_line_error(lambda: load_model(hf_dir, dtype="int4"), "int4")


# ----------------------------------------------------------------------------- save / convert


def test_save_is_atomic_and_refuses_foreign_folders(tmp_path, tiny):
    out = save_model(tiny, tmp_path / "m")
    save_model(make_model(seed=9), out)  # replaces a model folder
    np.testing.assert_array_equal(logits(load_model(out)), logits(make_model(seed=9)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    one_line_error(lambda: save_model(tiny, tmp_path / "docs"), "docs", "refusing")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("bits,group,tol", [(4, 32, 0.3), (8, 64, 0.03)])
def test_quantized_convert_round_trip(tmp_path, hf_dir, tiny, bits, group, tol):
    out = convert(hf_dir, tmp_path / f"q{bits}", q_bits=bits, q_group_size=group)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": group, "bits": bits, "mode": "affine"}
    model, tok = load(out)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    if group == 64:  # the FFN width 224 is no multiple of 64: down_proj stays float
        assert isinstance(model.layers[0].mlp.down_proj, nn.Linear)
    ref, got = logits(tiny), logits(model)
    rel = np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2))
    print(f"{bits}-bit relative rms error {rel:.4f}")
    assert rel < tol


def test_mlx_lm_loads_our_folders(tmp_path, hf_dir, tiny):
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.utils import load_model as mlx_lm_load_model

    theirs, their_tok = mlx_lm.load(str(hf_dir))
    ours, our_tok = load(hf_dir)
    assert np.abs(logits(theirs) - logits(ours)).max() <= 1e-4
    assert their_tok.encode("the quick brown fox") == our_tok.encode("the quick brown fox")
    q = convert(hf_dir, tmp_path / "q4", q_bits=4, q_group_size=32)
    theirs, _ = mlx_lm_load_model(q)
    assert np.abs(logits(theirs) - logits(load_model(q))).max() <= 1e-4


# ----------------------------------------------------------------------------- hub


def test_hub_repo_id_is_downloaded_safetensors_only(monkeypatch, hf_dir):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(hf_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, tok = load("meta-llama/Llama-2-7b-chat-hf")
    assert tok.vocab_size == model.args.vocab_size
    (repo, kw), = calls
    assert repo == "meta-llama/Llama-2-7b-chat-hf"
    assert kw["allow_patterns"] == HUB_PATTERNS
    assert "*.safetensors" in HUB_PATTERNS and not any(".bin" in p for p in HUB_PATTERNS)


def _hub_error(kind):
    from huggingface_hub import errors

    response = types.SimpleNamespace(headers={}, request=None, status_code=403)
    if kind == "offline":
        return errors.LocalEntryNotFoundError("cannot find the requested files in the cache")
    if kind == "gated":
        return errors.GatedRepoError("403 Client Error.\nAccess restricted", response=response)
    return errors.RepositoryNotFoundError("404 Client Error.\nRepository Not Found",
                                          response=response)


@pytest.mark.parametrize("kind,hint", [("offline", "local path"), ("gated", "licence"),
                                       ("missing", "no such")])
def test_hub_errors_are_one_line_with_advice(monkeypatch, kind, hint):
    import huggingface_hub

    def fail(repo_id, **kw):
        raise _hub_error(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    msg = one_line_error(lambda: load("meta-llama/Llama-2-7b-chat-hf"),
                         "meta-llama/Llama-2-7b-chat-hf", hint)
    if kind == "gated":
        assert "login" in msg
    one_line_error(lambda: load("./no/such/dir/"), "no such file or folder")


# ----------------------------------------------------------------------------- CLI


def test_cli_convert(tmp_path, hf_dir):
    from cli.app import app

    runner = CliRunner()
    prefix = ["convert"] if len(app.registered_commands) > 1 else []
    out = tmp_path / "q8"
    r = runner.invoke(app, prefix + ["--model", str(hf_dir), "--out", str(out), "--dtype",
                                     "bfloat16", "-q", "--q-bits", "8", "--q-group-size", "32"])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.model").is_file()
    assert load_model(out).layers[0].input_layernorm.weight.dtype == mx.bfloat16

    r = runner.invoke(app, prefix + ["--model", str(hf_dir), "--out", str(tmp_path / "x"),
                                     "-q", "--q-bits", "7"])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: --q-bits 7") and r.stderr.count("\n") == 1
    r = runner.invoke(app, prefix + ["--model", str(tmp_path / "nope"), "--out", str(out)])
    assert r.exit_code == 2 and "no such file or folder" in r.stderr
