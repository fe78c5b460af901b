"""The ``llama2-mlx`` model type of lm-evaluation-harness, offline: a local YAML task over
a JSONL multiple-choice file on the tiny test model. lm-eval's accuracy is the picks of
our own scoring; ``loglikelihood`` is minus ``llama2 eval``'s NLL of the same tokens."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS_WORDS

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from llama2_mlx.eval.harness import MODEL_TYPE, Llama2MLX  # noqa: E402
from llama2_mlx.eval.perplexity import score_samples  # noqa: E402
from llama2_mlx.eval.report import EvalOptions, evaluate_file  # noqa: E402
from llama2_mlx.training.data import Sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "llama2_mlx_tiny_mc"


def mc_task(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """A YAML task over a local JSONL file of 4-way multiple-choice questions."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        q = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 7)))
        choices = [" ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(1, 3)))
                   for _ in range(4)]
        docs.append({"question": q, "choices": choices, "answer": rng.randrange(4)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def pair(tok, context: str, continuation: str):
    """lm-eval's split of a causal request: trailing spaces of the context go to the
    continuation, whose ids are the whole string's after the context's."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx = tok.encode(context, bos=True)
    return ctx, tok.encode(context + continuation, bos=True)[len(ctx):]


def our_loglikelihoods(model, tok, pairs):
    samples = [Sample(c + t, [False] * len(c) + [True] * len(t)) for c, t in pairs]
    return -score_samples(model, samples, batch_size=5).nll


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def lm(model_dir):
    return Llama2MLX(model=str(model_dir), batch_size=4)


def test_lm_eval_accuracy_is_the_picks_of_our_loglikelihoods(tmp_path, lm, tok):
    from lm_eval.tasks import TaskManager

    folder = mc_task(tmp_path / "task")
    out = lm_eval.simple_evaluate(
        model=MODEL_TYPE, model_args={"model": lm.name}, tasks=[TASK], batch_size=3,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False), log_samples=True)
    docs = [json.loads(x) for x in (folder / "mc.jsonl").read_text().splitlines()]
    lls = our_loglikelihoods(lm.model, tok, [pair(tok, d["question"], " " + c)
                                             for d in docs for c in d["choices"]])
    picks = lls.reshape(len(docs), 4).argmax(1)
    want = float(np.mean(picks == [d["answer"] for d in docs]))
    assert out["results"][TASK]["acc,none"] == pytest.approx(want)
    got = np.array([[r[0] for r in s["filtered_resps"]] for s in
                    sorted(out["samples"][TASK], key=lambda s: s["doc_id"])])
    np.testing.assert_allclose(got.reshape(-1), lls, rtol=1e-5, atol=1e-5)
    assert 0 < want < 1 or len(set(picks)) > 1  # a test that can tell picks apart


def test_loglikelihood_equals_llama2_eval_on_the_same_continuation(tmp_path, lm, model_dir, tok):
    requests = [("the quick brown fox", " jumps over"), ("what is one plus two", " three"),
                ("hello ", "world"), ("", "the lazy dog")]
    got = lm.loglikelihood([req("loglikelihood", c, t) for c, t in requests])
    want = our_loglikelihoods(lm.model, tok, [pair(tok, c, t) for c, t in requests[:3]])
    np.testing.assert_allclose([g for g, _ in got[:3]], want, rtol=1e-5, atol=1e-5)
    # An empty context: the continuation after BOS.
    ids = tok.encode("the lazy dog", bos=True)
    empty = our_loglikelihoods(lm.model, tok, [(ids[:1], ids[1:])])[0]
    assert got[3][0] == pytest.approx(empty, rel=1e-5)
    assert all(isinstance(g, bool) for _, g in got)

    # chat=true: the request is a prompt/completion record, its loss what `llama2 eval` reports.
    chat = Llama2MLX(lm=lm.model, tokenizer=tok, chat=True)
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": c or "hi", "completion": t}) + "\n"
                            for c, t in requests))
    report = evaluate_file(EvalOptions(data=str(data), max_seq_length=128, progress=False),
                           lm.model, tok, log=lambda m: None)
    got = chat.loglikelihood([req("loglikelihood", c or "hi", t) for c, t in requests])
    np.testing.assert_allclose([g for g, _ in got], -report.scores["base"].nll, rtol=1e-5, atol=1e-5)


def test_loglikelihood_rolling_and_generate_until(lm, tok):
    from llama2_mlx.generation.generate import GenerationConfig, generate

    text = "the quick brown fox jumps over the lazy dog one two three four five"
    ids = tok.encode(text, bos=True)
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    want = our_loglikelihoods(lm.model, tok, [(ids[:1], ids[1:])])[0]
    assert got == pytest.approx(want, rel=1e-5)
    short = Llama2MLX(lm=lm.model, tokenizer=tok, max_length=5)
    (windowed,) = short.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert np.isfinite(windowed) and windowed != pytest.approx(got, rel=1e-4)

    (out,) = lm.generate_until([req("generate_until", "what is one plus", {"until": ["."], "max_gen_toks": 12})])
    want = generate(lm.model, tok, tok.encode("what is one plus", bos=True),
                    GenerationConfig(max_tokens=12, stop=["."]))
    assert out == want and "." not in out


def test_the_command_lines_register_the_model_type(tmp_path, model_dir, monkeypatch):
    """``python -m llama2_mlx.eval.harness`` runs lm-eval's command line in a fresh process
    (nothing of ours imported first); ``llama2 lm-eval`` hands its arguments to the same."""
    folder = mc_task(tmp_path / "task", n=4)
    args = ["--model", MODEL_TYPE, "--model_args", f"model={model_dir}", "--tasks", TASK,
            "--include_path", str(folder), "--batch_size", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "llama2_mlx.eval.harness", *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert TASK in r.stdout and "acc" in r.stdout

    import lm_eval.__main__
    from lm_eval.api.registry import get_model
    from typer.testing import CliRunner

    from cli.app import app

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate",
                        lambda: seen.append((list(sys.argv), get_model(MODEL_TYPE))))
    saved = list(sys.argv)
    res = CliRunner().invoke(app, ["lm-eval", *args])
    assert res.exit_code == 0, (res.output, res.exception)
    assert seen == [(["lm-eval", *args], Llama2MLX)] and sys.argv == saved
