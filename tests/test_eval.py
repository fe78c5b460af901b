"""``llama2 eval``: its NLL is lora-train's loss (trainer.evaluate on the same file and
settings), transformers' on the same token ids and mask, and does not depend on
batching or packing; the bootstrap intervals; the CLI."""

from __future__ import annotations

import json
import random
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import CORPUS_WORDS, make_model
from typer.testing import CliRunner

from llama2_mlx.eval.perplexity import bootstrap, interval, score_samples
from llama2_mlx.eval.report import EvalOptions, compare, evaluate_file
from llama2_mlx.models.lora import LoRAConfig, apply_lora, fuse_lora, twin
from llama2_mlx.training.data import SFTBatches, load_samples
from llama2_mlx.training.sft import SFTOptions, lora_train, sft_loss
from llama2_mlx.training.trainer import evaluate

runner = CliRunner()


def words(rng, lo, hi):
    return " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(lo, hi)))


def write_records(path, n, seed=0):
    """All three record kinds: prompt/completion (with and without a system prompt),
    multi-turn chat messages and plain text."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            kind = i % 4
            if kind == 0:
                rec = {"prompt": words(rng, 2, 6), "completion": words(rng, 1, 4)}
            elif kind == 1:
                rec = {"system": words(rng, 2, 4), "prompt": words(rng, 2, 5),
                       "completion": words(rng, 1, 3)}
            elif kind == 2:
                rec = {"messages": [
                    {"role": "user", "content": words(rng, 2, 5)},
                    {"role": "assistant", "content": words(rng, 1, 3)},
                    {"role": "user", "content": words(rng, 2, 4)},
                    {"role": "assistant", "content": words(rng, 1, 3)}]}
            else:
                rec = {"text": words(rng, 3, 10)}
            f.write(json.dumps(rec) + "\n")
    return path


def lora_model(seed=0):
    model = make_model()
    mx.random.seed(seed)
    apply_lora(model, LoRAConfig(rank=4))
    # Non-zero B so that the adapter changes the model.
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    mx.eval(model.parameters())
    return model


def test_nll_equals_lora_train_test_and_validation_loss(tmp_path, model_dir, tok, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.jsonl", 24, 0)
    write_records(data / "valid.jsonl", 10, 1)
    write_records(data / "test.jsonl", 11, 2)
    logged = []
    opts = SFTOptions.resolve(dict(
        model=str(model_dir), data=str(data), adapter_path=str(tmp_path / "ad"), iters=3,
        batch_size=2, lr=1e-2, max_seq_length=64, val_every=3, val_batches=-1, save_every=0,
        rank=4, progress=False))
    result = lora_train(opts, log=logged.append)
    shown = "\n".join(logged) + capsys.readouterr().err  # val lines go to the bar's console
    val = float(re.findall(r"step 3: val loss (\d+\.\d+)", shown)[-1])
    out = {split: evaluate_file(EvalOptions(
        model=str(model_dir), data=str(data / f"{split}.jsonl"), adapter_paths=[str(tmp_path / "ad")],
        max_seq_length=64, batch_size=3, progress=False), log=lambda m: None)
        for split in ("test", "valid")}
    base, tuned = out["test"].models
    assert tuned.nll == pytest.approx(result.test_loss, rel=1e-5, abs=1e-6)
    assert abs(out["valid"].models[1].nll - val) <= 5e-5  # the log prints 4 decimals
    assert tuned.tokens == out["test"].scores["base"].tokens.sum()
    # The base: what trainer.evaluate says for lora-train's (packed) test batches.
    from llama2_mlx.checkpoints.load import load

    model, _ = load(model_dir)
    samples = load_samples(data / "test.jsonl", tok)
    ref, n = evaluate(model, sft_loss, SFTBatches(samples, 2, 64, pack=True, shuffle=False)(0))
    assert base.nll == pytest.approx(ref, rel=1e-5) and base.tokens == n
    assert tuned.nll < base.nll  # 3 steps at lr 1e-2 learn something


def test_nll_matches_transformers_on_the_same_ids_and_mask(tmp_path, model_dir, tok):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llama2_mlx.checkpoints.load import load

    samples = load_samples(write_records(tmp_path / "d.jsonl", 12), tok)
    model, _ = load(model_dir)
    ours = score_samples(model, samples, batch_size=4)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    hf.eval()
    nll, count = [], []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.tokens])
            logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
            tok_nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(s.targets[1:], dtype=torch.float32)
            nll.append(float((tok_nll * mask).sum()))
            count.append(int(mask.sum()))
    np.testing.assert_allclose(ours.nll, nll, rtol=1e-4, atol=1e-4)
    assert ours.tokens.tolist() == count
    assert ours.mean == pytest.approx(sum(nll) / sum(count), rel=1e-4)


def test_batching_order_and_packing_do_not_change_the_nll(tmp_path, tok):
    model = lora_model()
    samples = load_samples(write_records(tmp_path / "d.jsonl", 17), tok)
    one = score_samples(model, samples, batch_size=1)
    for bs in (3, 16):
        np.testing.assert_allclose(score_samples(model, samples, batch_size=bs).nll, one.nll,
                                   rtol=1e-5, atol=1e-5)
    order = np.random.RandomState(0).permutation(len(samples))
    shuffled = score_samples(model, [samples[i] for i in order], batch_size=4)
    np.testing.assert_allclose(shuffled.nll, one.nll[order], rtol=1e-5, atol=1e-5)
    for pack, bs in ((True, 1), (True, 4), (False, 5)):
        ref, n = evaluate(model, sft_loss, SFTBatches(samples, bs, 64, pack=pack, seed=3)(0))
        assert one.mean == pytest.approx(ref, rel=1e-5) and int(one.tokens.sum()) == n
    assert one.positions == sum(len(s) - 1 for s in samples)


def test_an_adapter_twin_leaves_the_base_alone_and_equals_its_fused_model(tmp_path, tok):
    from llama2_mlx.models.lora import save_adapters

    samples = load_samples(write_records(tmp_path / "d.jsonl", 9), tok)
    tuned = lora_model()
    save_adapters(tuned, tmp_path / "ad", LoRAConfig(rank=4))
    base = make_model()
    before = score_samples(base, samples).nll
    opts = EvalOptions(data=str(tmp_path / "d.jsonl"), adapter_paths=[str(tmp_path / "ad")],
                       max_seq_length=64, progress=False)
    report = evaluate_file(opts, base, tok, log=lambda m: None)
    np.testing.assert_allclose(report.scores["base"].nll, before, rtol=1e-6)
    np.testing.assert_allclose(score_samples(base, samples).nll, before, rtol=1e-6)
    fused = fuse_lora(twin(tuned))
    np.testing.assert_allclose(report.scores[str(tmp_path / "ad")].nll,
                               score_samples(fused, samples).nll, rtol=1e-4, atol=1e-4)
    assert not np.allclose(report.scores[str(tmp_path / "ad")].nll, before, rtol=1e-3)


def test_bootstrap_is_seeded_token_weighted_and_paired():
    rng = np.random.default_rng(1)
    R = 400
    tokens = rng.integers(1, 20, R).astype(float)
    a = rng.gamma(2.0, 1.0, R) * tokens  # per-record NLL sums
    b = a * 0.9 + rng.normal(0, 0.05, R) * tokens  # a model close to a, record by record
    means = bootstrap(np.stack([a, b]), tokens, 2000, seed=5)
    assert means.shape == (2, 2000)
    np.testing.assert_array_equal(means, bootstrap(np.stack([a, b]), tokens, 2000, seed=5))
    assert not np.array_equal(means, bootstrap(np.stack([a, b]), tokens, 2000, seed=6))
    # Each resample is a token-weighted mean of drawn records: a model with the same NLL a
    # token on every record has exactly that mean on every resample.
    np.testing.assert_allclose(bootstrap(2.5 * tokens, tokens, 50)[0], 2.5)
    # The interval is about the normal one (ratio estimator: its linearised variance).
    mean = a.sum() / tokens.sum()
    sd = np.sqrt(np.sum((a - mean * tokens) ** 2) / R) / tokens.mean() / np.sqrt(R)
    lo, hi = interval(means[0])
    assert lo < mean < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * sd, rel=0.15)
    # Paired: the difference's interval is far narrower than the models' own intervals.
    d_lo, d_hi = interval(means[1] - means[0])
    assert d_hi < 0 and (d_hi - d_lo) < 0.3 * (hi - lo)
    lines = compare({"base": _scores(a, tokens), "b": _scores(b, tokens)}, {}, 2000, 5)
    assert lines[1].difference == pytest.approx(b.sum() / tokens.sum() - mean)
    assert lines[1].difference_interval == pytest.approx((d_lo, d_hi))
    assert lines[1].clear_of_zero and lines[1].verdict == "better, clear of zero"
    same = compare({"base": _scores(a, tokens), "a": _scores(a, tokens)}, {}, 100)[1]
    assert same.difference == 0 and same.difference_interval == (0.0, 0.0)
    assert same.verdict == "not clear of zero"


def _scores(nll, tokens):
    from llama2_mlx.eval.perplexity import Scores

    return Scores(np.asarray(nll), np.asarray(tokens, np.int64), np.zeros(len(nll), bool), 0, 1.0)


def test_cli_eval_table_json_per_record_and_errors(tmp_path, model_dir, tok):
    from cli.app import app
    from llama2_mlx.models.lora import save_adapters

    data = write_records(tmp_path / "d.jsonl", 8)
    ad = tmp_path / "ad"
    save_adapters(lora_model(), ad, LoRAConfig(rank=4))
    common = ["eval", "--model", str(model_dir), "--data", str(data), "--max-seq-length", "64",
              "--no-progress"]
    r = runner.invoke(app, common + ["--adapter-path", str(ad), "--per-record", str(tmp_path / "r.jsonl")])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "tokens", "NLL"]
    assert lines[1].startswith("base ") and lines[2].startswith(str(ad))
    assert "clear of zero" in lines[2] and "8 records" in lines[3]
    assert "tokens/s" in r.stderr
    recs = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and recs[0]["where"].endswith("d.jsonl line 1")
    assert set(recs[0]["nll"]) == {"base", str(ad)}

    r = runner.invoke(app, common + ["--adapter-path", str(ad), "--json", "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    base, tuned = out["models"]
    total = sum(x["tokens"] for x in recs)
    assert base["tokens"] == total
    assert base["nll"] == pytest.approx(sum(x["nll_sum"]["base"] for x in recs) / total, rel=1e-6)
    assert tuned["difference"]["nll"] == pytest.approx(tuned["nll"] - base["nll"])
    assert base["nll_interval"][0] < base["nll"] < base["nll_interval"][1]
    assert out["speed"]["tokens_per_s"] > 0

    for args, msg in (
        (["--data", str(tmp_path / "nope.jsonl")], "--data:"),
        (["--adapter-path", str(tmp_path / "none")], "--adapter-path:"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-seq-length", "4"], "--max-seq-length 4 + 1"),
        (["--level", "1.5"], "--level must be in (0, 1)"),
    ):
        r = runner.invoke(app, common + args)
        assert r.exit_code == 2, (args, r.output)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (args, err)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    r = runner.invoke(app, common[:4] + [str(tmp_path / "bad.jsonl")])
    assert r.exit_code == 2 and "bad.jsonl line 1: has no 'completion'" in r.stderr
