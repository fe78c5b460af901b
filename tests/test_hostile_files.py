"""Hostile files end in one clear line, with bounded memory (issue 10, part A).

Each case builds a hostile input (a zip bomb, a stride-0 shard, an absurd config, a FIFO,
a link to /dev/zero, JSON nested 100 000 deep, a 5000-digit integer, a lone surrogate, a
YAML alias bomb, a 50 MB line, a weight_map leading out of the folder, a bad hub id...)
and runs the real CLI on it. ``CHILD`` cases (a representative of each class, and every
input that would hang or exhaust the test process itself were its guard removed) run
``python -m cli.app`` as a child process (see ``hostile.run_cli``): exit 2, one ``error:``
line naming the file / line / key, no traceback, peak RSS under 500 MB, no hang. The other
cases share those code paths and run in-process (Typer's runner) to keep the suite fast;
the readers' own guards are also tested directly, variant by variant.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY
from typer.testing import CliRunner

import hostile as H
from cli.app import app
from llama2_mlx.errors import Llama2Error

DEMO = H.ROOT / "llama2_mlx" / "demo" / "assets"
# Meta's sizes of 7B (params.json leaves vocab_size to the tokenizer: -1).
META_7B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5,
           "vocab_size": -1}
TINY_META = {k: v for k, v in TINY.items()}
META_NAMES = (["tok_embeddings.weight", "norm.weight", "output.weight"] + [
    f"layers.{i}.{n}" for i in range(32) for n in (
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
        "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
        "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight")])
SHAPES_7B = {"tok_embeddings.weight": (32000, 4096), "output.weight": (32000, 4096),
             "w1": (11008, 4096), "w3": (11008, 4096), "w2": (4096, 11008)}


def _shape_7b(name: str) -> tuple[int, ...]:
    if name in SHAPES_7B:
        return SHAPES_7B[name]
    if name.endswith("norm.weight"):
        return (4096,)
    return SHAPES_7B.get(name.split(".")[-2], (4096, 4096))


def copy_model(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.name not in skip and f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def hf_config(model: Path, **changes) -> dict:
    return {**json.loads((model / "config.json").read_text()), **changes}


def with_config(tmp: Path, model: Path, text: str) -> Path:
    d = copy_model(model, tmp / "m", skip=("config.json",))
    (d / "config.json").write_text(text)
    return d


def gen(folder, *more) -> tuple[str, ...]:
    return ("generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "1", *more)


def check(path) -> tuple[str, ...]:
    return ("demo", "check", "--data", str(path))


def train(tmp: Path, path, *more) -> tuple[str, ...]:
    return ("lora-train", "--model", str(DEMO), "--train", str(path), "--iters", "1",
            "--adapter-path", str(tmp / "adapters"), *more)


# ----------------------------------------------------------------------------- the cases


def _meta_with_fifo(tmp):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(TINY_META))
    H.fifo(d / "consolidated.00.pth")
    return d


CASES: dict = {}


def case(name: str, child: bool = False, timeout: float = H.TIMEOUT_S, max_rss_mb: float = 500):
    """Register ``build(tmp, model_dir) -> (CLI args, needles of the error line)``."""

    def register(build):
        CASES[name] = dict(build=build, child=child, timeout=timeout, max_rss_mb=max_rss_mb)
        return build

    return register


# 1. Memory from tiny files


@case("pth zip bomb (storage inflates to 1 GiB)", child=True)
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(META_7B))
    t = {"tok_embeddings.weight": H.Tensor("0", (65536, 4096))}
    H.torch_zip(d / "consolidated.00.pth", t, records={"0": H.deflated_zeros("", 1 << 30)})
    return gen(d), ("consolidated.00.pth", "compressed")


@case("pth data.pkl bomb (inflates to 1 GiB)", child=True)
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(META_7B))
    H.zip_file(d / "consolidated.00.pth", [H.deflated_zeros("archive/data.pkl", 1 << 30)])
    return gen(d), ("consolidated.00.pth", "data.pkl")


@case("pth stride-0 shard standing for 7B", child=True)
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(META_7B))
    tensors = {n: H.Tensor("0", _shape_7b(n), stride=[0] * len(_shape_7b(n)), numel=1)
               for n in META_NAMES}
    H.torch_zip(d / "consolidated.00.pth", tensors)
    assert (d / "consolidated.00.pth").stat().st_size < 64 << 10
    return gen(d), ("consolidated.00.pth", "stride 0")


@case("pth overlapping strides")
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(META_7B))
    t = {"tok_embeddings.weight": H.Tensor("0", (32000, 4096), stride=(1, 1), numel=36095)}
    H.torch_zip(d / "consolidated.00.pth", t)
    return gen(d), ("consolidated.00.pth", "overlapping")


@case("pth tensors sharing one storage")
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({**TINY_META, "n_layers": 1}))
    tensors = {f"layers.0.attention.w{x}.weight": H.Tensor("0", (64, 64)) for x in "qo"}
    H.torch_zip(d / "consolidated.00.pth", tensors)
    return gen(d), ("consolidated.00.pth", "share storage")


@case("pth storage record missing")
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(TINY_META))
    t = {"tok_embeddings.weight": H.Tensor("7", (512, 64))}
    H.torch_zip(d / "consolidated.00.pth", t, records={"7": None})
    return gen(d), ("consolidated.00.pth", "missing")


@case("pth storage smaller than its tensor claims")
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(META_7B))
    t = {"tok_embeddings.weight": H.Tensor("0", (32000, 4096))}
    H.torch_zip(d / "consolidated.00.pth", t, records={"0": H.stored("", b"\0" * 64)})
    return gen(d), ("consolidated.00.pth", "storage 0")


@case("pytorch_model.bin of 192 MB that does not fit the config (not materialised)",
      child=True, max_rss_mb=150)
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    t = {"model.embed_tokens.weight": H.Tensor("0", (3 << 18, 64))}
    H.torch_zip(d / "pytorch_model.bin", t)
    return gen(d), ("pytorch_model.bin", "describes 176,448 parameters", "hold 50,331,648")


@case("config.json num_hidden_layers 1e9", child=True)
def _(tmp, model):
    return gen(with_config(tmp, model, json.dumps(hf_config(model, num_hidden_layers=10**9)))), (
        "config.json", "num_hidden_layers")


@case("config.json of 7B over a tiny model's weights")
def _(tmp, model):
    cfg = hf_config(model, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)
    return gen(with_config(tmp, model, json.dumps(cfg))), ("describes 6,738,415,616 parameters",
                                                           "config.json")


@case("safetensors header: dtype*shape != data_offsets")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    H.safetensors_file(d / "model.safetensors", {
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [32000, 4096],
                                      "data_offsets": [0, 8]}}, b"\0" * 8)
    return gen(d), ("model.safetensors", "data_offsets")


@case("safetensors header: overlapping data ranges")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    e = {"dtype": "F32", "shape": [512, 64], "data_offsets": [0, 512 * 64 * 4]}
    H.safetensors_file(d / "model.safetensors", {"model.embed_tokens.weight": e,
                                                  "lm_head.weight": e}, b"\0" * (512 * 64 * 4))
    return gen(d), ("model.safetensors", "overlaps")


@case("safetensors header: negative offsets")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    H.safetensors_file(d / "model.safetensors", {"model.norm.weight": {
        "dtype": "F32", "shape": [64], "data_offsets": [-256, 0]}}, b"\0" * 256)
    return gen(d), ("model.safetensors", "data_offsets")


@case("safetensors header: duplicate tensor names")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    e = '{"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}'
    raw = ('{"model.norm.weight": %s, "model.norm.weight": %s}' % (e, e)).encode()
    H.safetensors_file(d / "model.safetensors", {}, b"\0" * 256, raw_header=raw)
    return gen(d), ("model.safetensors", "duplicate key")


@case("safetensors header: unknown dtype, huge shape")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    H.safetensors_file(d / "model.safetensors", {"model.norm.weight": {
        "dtype": "F128", "shape": [1 << 62], "data_offsets": [0, 0]}})
    return gen(d), ("model.safetensors", "dtype")


@case("pth data.pkl memo bomb (13 bytes: LONG_BINPUT 2**31)", child=True)
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(TINY_META))
    H.zip_file(d / "consolidated.00.pth", [H.stored("archive/data.pkl",
                                                    b"\x80\x02Nr\xff\xff\xff\x7f.")])
    return gen(d), ("consolidated.00.pth", "memo index")


@case("pth tok_embeddings.weight of 0 dimensions (Meta, vocab_size -1)")
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({**TINY_META, "vocab_size": -1}))
    H.torch_zip(d / "consolidated.00.pth", {"tok_embeddings.weight": H.Tensor("0", ())})
    return gen(d), ("consolidated.00.pth", "tok_embeddings.weight", "not (vocab, dim)")


@case("safetensors weights of int32")
def _(tmp, model):
    import mlx.core as mx

    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    w = mx.load(str(model / "model.safetensors"))
    mx.save_safetensors(str(d / "model.safetensors"), {k: v.astype(mx.int32) for k, v in w.items()})
    return gen(d), ("model.safetensors", "is I32")


@case("safetensors tensor name holding a newline")
def _(tmp, model):
    d = copy_model(model, tmp / "m")
    H.safetensors_file(d / "model-2.safetensors", {"x\nerror: injected\u2028": {
        "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    return gen(d), ("model-2.safetensors", "unexpected tensor x\\nerror: injected\\u2028")


@case("Meta shard named with bytes that are not UTF-8")
def _(tmp, model):
    d = _meta_with_fifo(tmp)
    os.unlink(d / "consolidated.00.pth")
    H.torch_zip(d / "consolidated.00.pth", {"tok_embeddings.weight": H.Tensor("0", (512, 64))})
    open(os.path.join(os.fsencode(d), b"consolidated.\xff.pth"), "wb").close()
    return gen(d), ("Meta shards", "consolidated.\\udcff.pth")


@case("consolidated.00.pth a symlink to itself")
def _(tmp, model):
    d = _meta_with_fifo(tmp)
    os.unlink(d / "consolidated.00.pth")
    H.link(d / "consolidated.00.pth", "consolidated.00.pth")
    return gen(d), ("consolidated.00.pth", "cannot resolve")


# 2. Config values


def _config_case(name, key, value, needle=None):
    @case(f"config.json {key} = {value!r:.30}")
    def _(tmp, model):
        return gen(with_config(tmp, model, json.dumps(hf_config(model, **{key: value})))), (
            "config.json", needle or key)


for _key, _value in [("num_attention_heads", 0), ("num_attention_heads", 3),
                     ("num_key_value_heads", 3), ("hidden_size", -64), ("hidden_size", "64"),
                     ("num_hidden_layers", True), ("vocab_size", -1), ("intermediate_size", 0),
                     ("rope_theta", -1.0), ("rms_norm_eps", 0), ("max_position_embeddings", 2.5),
                     ("head_dim", 7), ("quantization", {"bits": 99}),
                     ("quantization_config", "gptq")]:
    _config_case("config", _key, _value)


@case("config.json rope_theta NaN (ran and printed garbage)", child=True)
def _(tmp, model):
    text = json.dumps(hf_config(model, rope_theta=float("nan")))  # Python writes NaN
    return gen(with_config(tmp, model, text)), ("config.json", "rope_theta")


@case("config.json rms_norm_eps Infinity")
def _(tmp, model):
    return gen(with_config(tmp, model, json.dumps(hf_config(model, rms_norm_eps=float("inf"))))), (
        "config.json", "rms_norm_eps")


@case("params.json n_heads 0 (Meta layout)")
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({**TINY_META, "n_heads": 0}))
    H.torch_zip(d / "consolidated.00.pth", {"tok_embeddings.weight": H.Tensor("0", (512, 64))})
    return gen(d), ("params.json", "n_heads")


@case("params.json multiple_of 0 (Meta layout)")
def _(tmp, model):
    d = tmp / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({**TINY_META, "multiple_of": 0}))
    H.torch_zip(d / "consolidated.00.pth", {"tok_embeddings.weight": H.Tensor("0", (512, 64))})
    return gen(d), ("params.json", "multiple_of")


@case("adapter_config.json rank 10**12")
def _(tmp, model):
    a = tmp / "adapters"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2,
         "lora_parameters": {"rank": 10**12, "scale": 20.0, "dropout": 0.0}}))
    H.safetensors_file(a / "adapters.safetensors", {})
    return gen(model, "--adapter-path", str(a)), ("adapter_config.json", "rank")


@case("adapter_config.json keys a string, scale NaN")
def _(tmp, model):
    a = tmp / "adapters"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps(
        {"lora_parameters": {"rank": 8, "scale": float("nan"), "keys": "q_proj"}}))
    H.safetensors_file(a / "adapters.safetensors", {})
    return gen(model, "--adapter-path", str(a)), ("adapter_config.json", "scale")


# 3. Readers


@case("config.json nested 100 000 deep", child=True)
def _(tmp, model):
    return gen(with_config(tmp, model, H.nested_json(100_000))), ("config.json", "nested")


@case("config.json 5000-digit integer")
def _(tmp, model):
    text = json.dumps(hf_config(model)).replace('"vocab_size": 512', '"vocab_size": '
                                                + H.huge_int())
    return gen(with_config(tmp, model, text)), ("config.json", "invalid JSON")


@case("config.json not UTF-8")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("config.json",))
    (d / "config.json").write_bytes(b'{"model_type": "ll\xffama"}')
    return gen(d), ("config.json", "UTF-8")


@case("config.json duplicate keys")
def _(tmp, model):
    text = json.dumps(hf_config(model))[:-1] + ', "hidden_size": 4096}'
    return gen(with_config(tmp, model, text)), ("config.json", "duplicate key 'hidden_size'")


@case("train.jsonl lone surrogate (crashed sentencepiece)", child=True)
def _(tmp, model):
    f = tmp / "train.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "\\ud800", "completion": "b"}\n')
    return train(tmp, f), ("train.jsonl line 2", "surrogate")


@case("train.jsonl nested 100 000 deep")
def _(tmp, model):
    f = tmp / "train.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n' + H.nested_json(100_000) + "\n")
    return check(f), ("train.jsonl line 2", "nested")


@case("train.jsonl 5000-digit integer")
def _(tmp, model):
    f = tmp / "train.jsonl"
    f.write_text('{"prompt": %s}\n' % H.huge_int())
    return check(f), ("train.jsonl line 1", "invalid JSON")


@case("train.jsonl invalid UTF-8 on line 3")
def _(tmp, model):
    f = tmp / "train.jsonl"
    f.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "\xc3("}\n')
    return check(f), ("train.jsonl", "line 3", "UTF-8")


@case("train.jsonl one 50 MB line", child=True)
def _(tmp, model):
    return check(H.long_line_file(tmp / "train.jsonl", 50)), ("train.jsonl line 1", "longer than")


@case("--config YAML alias bomb", child=True)
def _(tmp, model):
    f = tmp / "bomb.yaml"
    f.write_text(H.yaml_alias_bomb())
    assert f.stat().st_size < 1000
    return train(tmp, tmp / "train.jsonl", "--config", str(f)), ("bomb.yaml", "aliases")


@case("--config YAML 5000-digit integer")
def _(tmp, model):
    f = tmp / "c.yaml"
    f.write_text(f"rank: {H.huge_int()}\n")
    return train(tmp, tmp / "train.jsonl", "--config", str(f)), ("c.yaml", "invalid YAML")


@case("--config YAML nested 100 000 deep")
def _(tmp, model):
    f = tmp / "c.yaml"
    f.write_text("keys: " + H.nested_json(100_000) + "\n")
    return train(tmp, tmp / "train.jsonl", "--config", str(f)), ("c.yaml", "nested")


@case("--config YAML with a non-string key")
def _(tmp, model):
    f = tmp / "c.yaml"
    f.write_text("1: 2\n")
    return train(tmp, tmp / "train.jsonl", "--config", str(f)), ("c.yaml", "not a string")


@case("--config JSON lone surrogate")
def _(tmp, model):
    f = tmp / "c.json"
    f.write_text('{"keys": ["\\udfff"]}')
    return train(tmp, tmp / "train.jsonl", "--config", str(f)), ("c.json", "surrogate")


# 4. Files that are not files


@case("FIFO consolidated.00.pth (hung)", child=True, timeout=20)
def _(tmp, model):
    return gen(_meta_with_fifo(tmp)), ("consolidated.00.pth", "FIFO")


@case("FIFO model.safetensors (hung)", child=True, timeout=20)
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    H.fifo(d / "model.safetensors")
    return gen(d), ("model.safetensors", "FIFO")


@case("FIFO train.jsonl (hung)", child=True, timeout=20)
def _(tmp, model):
    return check(H.fifo(tmp / "train.jsonl")), ("train.jsonl", "FIFO")


@case("FIFO --config (hung)", child=True, timeout=20)
def _(tmp, model):
    return train(tmp, tmp / "train.jsonl", "--config", str(H.fifo(tmp / "c.yaml"))), (
        "c.yaml", "FIFO")


@case("tokenizer.model a named pipe")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("tokenizer.model",))
    H.fifo(d / "tokenizer.model")
    return gen(d), ("tokenizer.model",)


@case("train.jsonl -> /dev/zero", child=True)
def _(tmp, model):
    return check(H.link(tmp / "train.jsonl", "/dev/zero")), ("train.jsonl", "character device")


@case("--config -> /dev/zero", child=True)
def _(tmp, model):
    f = H.link(tmp / "c.yaml", "/dev/zero")
    return train(tmp, tmp / "train.jsonl", "--config", str(f)), ("c.yaml", "character device")


@case("--train is a folder")
def _(tmp, model):
    (tmp / "data").mkdir()
    return train(tmp, tmp / "data"), ("data", "folder")


@case("model.safetensors -> /proc/self/mem")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    H.link(d / "model.safetensors", "/proc/self/mem")
    return gen(d), ("model.safetensors", "outside the model folder")


@case("model.safetensors -> a model file outside the folder")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("model.safetensors",))
    H.link(d / "model.safetensors", model / "model.safetensors")
    return gen(d), ("model.safetensors", "outside the model folder")


def _index_case(tmp, model, weight_map):
    d = copy_model(model, tmp / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


@case("index.json weight_map value a number")
def _(tmp, model):
    return gen(_index_case(tmp, model, {"model.norm.weight": 5})), (
        "model.safetensors.index.json", "weight_map")


@case("index.json weight_map value ../outside.safetensors")
def _(tmp, model):
    shutil.copy(model / "model.safetensors", tmp / "outside.safetensors")
    return gen(_index_case(tmp, model, {"model.norm.weight": "../outside.safetensors"})), (
        "model.safetensors.index.json", "not a file name")


@case("index.json weight_map value an absolute path")
def _(tmp, model):
    return gen(_index_case(tmp, model, {"model.norm.weight": str(model / "model.safetensors")})), (
        "model.safetensors.index.json", "not a file name")


@case("tokenizer.model garbage")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("tokenizer.model",))
    (d / "tokenizer.model").write_bytes(os.urandom(4096))
    return gen(d), ("tokenizer.model", "not a SentencePiece model")


@case("tokenizer.model empty")
def _(tmp, model):
    d = copy_model(model, tmp / "m", skip=("tokenizer.model",))
    (d / "tokenizer.model").write_bytes(b"")
    return gen(d), ("tokenizer.model", "empty")


# 8. Names


@case("hub id a/..")
def _(tmp, model):
    return gen("a/.."), ("a/..", "repo id")


@case("hub id x/.git")
def _(tmp, model):
    return gen("x/.git"), ("x/.git", "repo id")


@case("--model of 5000 characters", child=True)
def _(tmp, model):
    return gen("m" * 5000), ("5,000 characters",)


@case("--model owner/name of 5000 characters")
def _(tmp, model):
    return gen("a/" + "b" * 5000), ("5,002 characters",)


@case("--train path of 5000 characters")
def _(tmp, model):
    return train(tmp, "t" * 5000), ("--train",)


@case("--adapter-path of 5000 characters")
def _(tmp, model):
    return gen(model, "--adapter-path", "a" * 5000), ("adapter_config.json",)


@case("convert --out of 5000 characters")
def _(tmp, model):
    return ("convert", "--model", str(model), "--out", "o" * 5000), ("5,0", "cannot write")


CHILD = [name for name, c in CASES.items() if c["child"]]
IN_PROCESS = [name for name, c in CASES.items() if not c["child"]]


@pytest.mark.parametrize("name", CHILD)
def test_hostile_file_ends_in_one_line_in_a_child_process(name, tmp_path, model_dir):
    c = CASES[name]
    args, needles = c["build"](tmp_path, model_dir)
    ended = H.run_cli(*args, cwd=tmp_path, timeout=c["timeout"])
    H.assert_one_line_error(ended, *needles, max_rss_mb=c["max_rss_mb"])


@pytest.mark.parametrize("name", IN_PROCESS)
def test_hostile_file_ends_in_one_line(name, tmp_path, model_dir):
    c = CASES[name]
    args, needles = c["build"](tmp_path, model_dir)
    r = CliRunner().invoke(app, list(args))
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), (
        r.exception)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_a_record_holding_u2028_is_read_whole(tmp_path):
    # The project's own writer (ensure_ascii=False) leaves U+2028 as it is.
    f = tmp_path / "answers.jsonl"
    rec = {"prompt": "What is the capital of France?", "response": "Paris\u2028\u2029\x85"}
    f.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    ended = H.run_cli(*check(f), cwd=tmp_path)
    assert ended.returncode == 0 and "capital" in ended.stdout, ended
    assert ended.max_rss_mb < H.MAX_RSS_MB


def test_earlier_outputs_are_intact(tmp_path, model_dir):
    """A hostile input refused mid-command leaves what the command would replace as it was."""
    out = copy_model(model_dir, tmp_path / "converted")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    bad = with_config(tmp_path, model_dir, json.dumps(hf_config(model_dir, num_hidden_layers=0)))
    ended = H.run_cli("convert", "--model", str(bad), "--out", str(out), cwd=tmp_path)
    H.assert_one_line_error(ended, "config.json", "num_hidden_layers")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text('{"kept": true}')
    f = H.long_line_file(tmp_path / "train.jsonl", 9)
    ended = H.run_cli(*train(tmp_path, f), cwd=tmp_path)
    H.assert_one_line_error(ended, "train.jsonl line 1", "longer than")
    assert sorted(p.name for p in adapters.iterdir()) == ["adapter_config.json"]
    assert (adapters / "adapter_config.json").read_text() == '{"kept": true}'


# ----------------------------------------------------------------------------- the readers


def _refused(fn, *needles) -> str:
    with pytest.raises(Llama2Error) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("text, needle", [
    (H.nested_json(100_000), "nested"),
    (H.nested_json(65), "nested"),  # under the recursion limit, over MAX_DEPTH
    ('{"a": ' + H.huge_int() + "}", "invalid JSON"),
    ('{"a": "\\ud800"}', "surrogate"),
    ('{"\\uDC00": 1}', "surrogate"),
    ('{"a": 1, "a": 2}', "duplicate key"),
    ('[1, 2]', "expected a JSON object"),
    ('{"a": tru}', "invalid JSON"),
])
def test_read_json_refuses(tmp_path, text, needle):
    from llama2_mlx.io.readers import read_json

    (tmp_path / "x.json").write_text(text)
    _refused(lambda: read_json(tmp_path / "x.json"), "x.json", needle)


def test_read_json_bounds_and_file_kinds(tmp_path):
    from llama2_mlx.io import readers

    big = tmp_path / "big.json"
    big.write_text('{"a": "' + "x" * 100 + '"}')
    _refused(lambda: readers.read_json(big, limit=50), "big.json", "more than")
    _refused(lambda: readers.read_json(tmp_path), "a folder")
    _refused(lambda: readers.read_json(H.fifo(tmp_path / "f.json")), "FIFO")
    _refused(lambda: readers.read_json(H.link(tmp_path / "z.json", "/dev/zero")),
             "character device")
    _refused(lambda: readers.read_json(tmp_path / ("n" * 5000)), "cannot read")
    _refused(lambda: readers.read_json(tmp_path / "missing.json"), "not found")
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert readers.read_json(tmp_path / "bom.json") == {"a": 1}


def test_read_jsonl_splits_on_newline_only_and_bounds_lines(tmp_path, monkeypatch):
    from llama2_mlx.io import readers

    f = tmp_path / "d.jsonl"
    recs = [{"prompt": "a\u2028b"}, {"prompt": "c\x85d\u2029\x0c\x1c"}]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in recs) + "\n")
    assert [r for _, r in readers.read_jsonl(f)] == recs
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 100)
    f.write_text('{"prompt": "x"}\n' + '{"prompt": "' + "y" * 200 + '"}\n')
    _refused(lambda: readers.read_jsonl(f), "d.jsonl line 2", "longer than 100 bytes")
    f.write_text('{"prompt": "' + "y" * 86 + '"}\n')  # 100 bytes and its newline: fits
    assert len(readers.read_jsonl(f)) == 1


def test_read_options_refuses_yaml_aliases_and_bounds(tmp_path):
    from llama2_mlx.io.readers import read_options

    f = tmp_path / "c.yaml"
    f.write_text("base: &b 1\nrank: *b\n")
    _refused(lambda: read_options(f), "c.yaml line 2", "aliases (*b)")
    f.write_text("rank: 8\nlr: 1.0e-4\n")  # anchors-free YAML is as before
    assert read_options(f) == {"rank": 8, "lr": 1e-4}
    f.write_text("rank: " + "[" * 70 + "]" * 70 + "\n")
    _refused(lambda: read_options(f), "c.yaml", "nested")
    f.write_text("x" * (1 << 20) + "y")
    _refused(lambda: read_options(f), "c.yaml", "more than")
    f.write_text("rank: '\\ud800'\n")  # a literal string, no surrogate: fine
    assert read_options(f) == {"rank": "\\ud800"}
    f.write_text('rank: "\\ud800"\n')
    _refused(lambda: read_options(f), "c.yaml", "surrogate")


def test_safetensors_header_variants(tmp_path):
    from llama2_mlx.formats.safetensors import safetensors_header

    f = tmp_path / "w.safetensors"
    ok = {"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}}
    H.safetensors_file(f, ok, b"\0" * 12)
    assert safetensors_header(f)["a"].shape == (2, 3)
    for header, data, needle in [
        (ok, b"\0" * 16, "past the last tensor"),
        (ok, b"\0" * 8, "truncated"),
        ({**ok, "b": {"dtype": "F16", "shape": [1], "data_offsets": [14, 16]}}, b"\0" * 16,
         "unused bytes"),
        ({"a": {"dtype": "F16", "shape": [2, True], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        ({"a": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
        ({"a": {"dtype": "F16", "shape": [1], "data_offsets": [2, 0]}}, b"\0" * 2, "data_offsets"),
        ({"a": {"dtype": "F16", "shape": [1], "data_offsets": "0-2"}}, b"\0" * 2, "data_offsets"),
        ({"a": [1, 2]}, b"", "corrupt header entry"),
        ({"__metadata__": 5}, b"", "__metadata__"),
    ]:
        H.safetensors_file(f, header, data)
        _refused(lambda: safetensors_header(f), "w.safetensors", needle)
    f.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    _refused(lambda: safetensors_header(f), "w.safetensors", "header")
    H.safetensors_file(f, {}, raw_header=b'{"a": "\xff"}')
    _refused(lambda: safetensors_header(f), "w.safetensors", "UTF-8")


def test_pth_reader_refuses_reused_elements(tmp_path):
    from llama2_mlx.formats.pth import read_pth

    f = tmp_path / "x.pth"
    good = {"a": H.Tensor("0", (3, 4)), "b": H.Tensor("1", (4, 3), stride=(1, 4)),
            "c": H.Tensor("2", (2, 2), offset=2, numel=6)}
    H.torch_zip(f, good)
    out = read_pth(f)
    assert {k: v.shape for k, v in out.items()} == {"a": (3, 4), "b": (4, 3), "c": (2, 2)}
    for tensors, records, needle in [
        ({"a": H.Tensor("0", (3, 4), stride=(0, 1), numel=4)}, None, "stride 0"),
        ({"a": H.Tensor("0", (3, 4), stride=(2, 1), numel=12)}, None, "overlapping"),
        ({"a": H.Tensor("0", (4,)), "b": H.Tensor("0", (2,), offset=2, numel=4)}, None,
         "share storage"),
        ({"a": H.Tensor("0", (4,))}, {"0": H.stored("", b"\0" * 20)}, "holds 20 bytes"),
        ({"a": H.Tensor("0", (4,))}, {"0": H.deflated_zeros("", 1 << 24)}, "compressed"),
        ({"a": H.Tensor("0", (4,), numel=1 << 50)}, None, "claims"),
        ({"a": H.Tensor("0", (4,) * 9)}, None, "malformed"),
    ]:
        (tmp_path / "x.pth").unlink()
        H.torch_zip(f, tensors, records=records or {"0": H.stored("", b"\0" * 16)})
        _refused(lambda: read_pth(f), "x.pth", needle)


def test_pth_reader_refuses_records_aliasing_other_bytes(tmp_path):
    from llama2_mlx.formats.pth import read_pth

    f = tmp_path / "x.pth"
    # Record data/1 is a second directory entry for data/0's bytes: 2 tensors, 1 copy.
    H.torch_zip(f, {"a": H.Tensor("0", (4,)), "b": H.Tensor("1", (4,))}, records={"1": None},
                aliases={"1": "0"})
    _refused(lambda: read_pth(f), "x.pth", "data/1")


@pytest.mark.parametrize("params, key", [
    ({"n_heads": 0}, "n_heads"), ({"dim": 0}, "dim"), ({"dim": 2.0}, "dim"),
    ({"n_layers": "2"}, "n_layers"), ({"n_layers": False}, "n_layers"),
    ({"multiple_of": -1}, "multiple_of"), ({"vocab_size": 1 << 40}, "vocab_size"),
    ({"norm_eps": float("nan")}, "norm_eps"), ({"norm_eps": 2}, "norm_eps"),
    ({"rope_theta": float("inf")}, "rope_theta"), ({"rope_theta": "1e4"}, "rope_theta"),
    ({"ffn_dim_multiplier": -1.3}, "ffn_dim_multiplier"), ({"max_seq_len": 0}, "max_seq_len"),
    ({"dim": 60, "n_heads": 4}, "odd size"), ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"hidden_dim": 1 << 30}, "hidden_dim"), ({"n_layers": 10**4000}, "n_layers"),
])
def test_model_args_are_type_and_range_checked(params, key):
    from llama2_mlx.models.model import ModelArgs

    with pytest.raises(ValueError, match=key.replace("(", r"\(")) as e:
        ModelArgs.from_dict({**TINY, **params})
    assert "\n" not in str(e.value)


def test_hf_config_errors_name_the_files_keys():
    from llama2_mlx.models.model import ModelArgs

    hf = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    for change, key in [({"num_attention_heads": 0}, "num_attention_heads"),
                        ({"num_hidden_layers": None}, "num_hidden_layers"),
                        ({"vocab_size": -1}, "vocab_size"),
                        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
                        ({"num_key_value_heads": 3}, "num_key_value_heads"),
                        ({"head_dim": 32}, "head_dim")]:
        if change.get("num_hidden_layers", 0) is None:
            continue  # None means absent: the loader says "missing key"
        with pytest.raises(ValueError, match=key):
            ModelArgs.from_dict({**hf, **change})


def test_hub_names(monkeypatch):
    from llama2_mlx.io import hub

    called = []
    monkeypatch.setattr(hub, "_download", lambda repo: called.append(repo))
    for name, needle in [("a/..", "repo id"), ("x/.git", "repo id"), ("a--b/c", "repo id"),
                         ("a/" + "b" * 100, "characters"), ("m" * 5000, "5,000 characters"),
                         ("a/b\0c", "no such file")]:
        _refused(lambda: hub.resolve(name), needle)
    assert called == []
    hub.resolve("meta-llama/Llama-2-7b-chat-hf")
    assert called == ["meta-llama/Llama-2-7b-chat-hf"]


def test_weight_files_stay_in_the_folder_but_hub_cache_links_are_followed(tmp_path, model_dir):
    from llama2_mlx.checkpoints.load import load_model

    # The Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>.
    repo = tmp_path / "models--o--n"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in model_dir.iterdir():
        shutil.copy(f, blobs / f"h-{f.name}")
        os.symlink(f"../../blobs/h-{f.name}", snap / f.name)
    assert load_model(snap).args.dim == TINY["dim"]
    os.unlink(snap / "model.safetensors")
    os.symlink(model_dir / "model.safetensors", snap / "model.safetensors")
    _refused(lambda: load_model(snap), "model.safetensors", "outside the model folder")


def test_reader_state_files(tmp_path):
    """Resume state, reward config, GGUF: the same guarantees."""
    from llama2_mlx.formats.gguf import read_gguf
    from llama2_mlx.rlhf.reward_model import read_reward_config
    from llama2_mlx.training.checkpoint import load_checkpoint

    step = tmp_path / "ck" / "step_0000001"
    step.mkdir(parents=True)
    H.safetensors_file(step / "params.safetensors", {})
    H.safetensors_file(step / "optimizer.safetensors", {})
    (step / "state.json").write_text('{"step": "x", "fingerprint": {}}')
    _refused(lambda: load_checkpoint(tmp_path / "ck"), "state.json", "step")
    (step / "state.json").write_text('{"step": 1, "fingerprint": {}, "train_losses": 5}')
    _refused(lambda: load_checkpoint(tmp_path / "ck"), "state.json", "train_losses")

    (tmp_path / "reward_config.json").write_text('{"base_model": 1, "fine_tune_type": "lora"}')
    _refused(lambda: read_reward_config(tmp_path), "reward_config.json", "base_model")
    (tmp_path / "reward_config.json").write_text(
        '{"base_model": "b", "fine_tune_type": "lora", "dim": -4}')
    _refused(lambda: read_reward_config(tmp_path), "reward_config.json", "dim")

    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + os.urandom(200))
    _refused(lambda: read_gguf(g), "m.gguf")
    _refused(lambda: read_gguf(H.fifo(tmp_path / "f.gguf")), "FIFO")
