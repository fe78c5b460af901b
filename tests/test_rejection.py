"""Rejection sampling and the rs-loop, with the proof that the RLHF loop works.

The synthetic task: the prompt is "<filler> <filler> repeat <word>" and the correct
answer is <word> (one of eight number words). The reward model is trained on
chosen-correct / rejected-wrong pairs. The starting policy is a tiny model
briefly fine-tuned on noisy answers (35% correct, 65% a fixed distractor: the
next number word), so single samples are mostly wrong and its greedy answer is
the distractor; best-of-K with the reward model should fix that, and one loop
iteration should move the policy itself.
"""

import importlib.util
import itertools
import json
import random

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model
from typer.testing import CliRunner

from cli.app import app
from llama2_mlx.chat.records import read_prompts
from llama2_mlx.chat.tokenizer import Tokenizer, train_tokenizer
from llama2_mlx.checkpoints.export import save_model
from llama2_mlx.checkpoints.load import load
from llama2_mlx.errors import Llama2Error
from llama2_mlx.generation.generate import GenerationConfig, batch_generate
from llama2_mlx.models.lora import LoRAConfig
from llama2_mlx.rlhf.rejection import RSConfig, _answer, _pick_best, rejection_sample
from llama2_mlx.rlhf.reward import (
    RewardTrainConfig,
    fit_reward_model,
    prepare_reward_model,
)
from llama2_mlx.rlhf.reward_data import PreferencePair, encode_pairs
from llama2_mlx.rlhf.reward_model import load_reward_model, save_reward_model
from llama2_mlx.rlhf.rs_loop import RSLoopConfig, rs_loop
from llama2_mlx.training.data import SFTBatches, load_samples, tokenize_record
from llama2_mlx.training.sft import DataConfig, SFTOptions, sft_loss
from llama2_mlx.training.trainer import TrainConfig, train

runner = CliRunner()

WORDS = "one two three four five six seven eight".split()
FILLERS = "the quick brown lazy hello world please llama".split()
SMALL = dict(dim=32, n_heads=2, n_kv_heads=1, vocab_size=384)
K = 8


def distractor(word: str) -> str:
    return WORDS[(WORDS.index(word) + 1) % len(WORDS)]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Task:
    """Tokenizer, prompt splits, trained reward model and starting policy (saved to disk)."""

    def __init__(self, root):
        combos = [(f"{a} {b} repeat {w}", w) for a, b, w in itertools.product(FILLERS, FILLERS, WORDS)]
        random.Random(0).shuffle(combos)
        # Disjoint prompt sets: RM train / RM held-out / rejection sampling / held-out eval.
        self.rm_train, self.rm_valid = combos[:256], combos[256:320]
        self.rs, self.held = combos[320:384], combos[384:416]
        rng = random.Random(1)
        corpus = root / "corpus.txt"
        corpus.write_text("".join(f"[INST] {p} [/INST] {rng.choice(WORDS)}\n"
                                  for p, _ in combos * 4))
        # A task tokenizer: the chat tags and the words become single pieces (short rows).
        self.tok = Tokenizer(train_tokenizer([corpus], root / "tok", 384, num_threads=1))
        assert all(len(self.tok.encode(w, bos=False)) == 1 for w in WORDS + FILLERS)

        def pairs(split, seed):
            r = random.Random(seed)
            return [PreferencePair(user(p), w, r.choice([x for x in WORDS if x != w]))
                    for p, w in split]

        config = RewardTrainConfig(
            fine_tune_type="full", batch_size=16, eval_every=0,
            train=TrainConfig(lr=2e-3, epochs=3, betas=(0.9, 0.95), weight_decay=0.0,
                              progress=False, save_every=0, seed=0))
        base = make_model(seed=1, **SMALL)
        save_model(base, root / "rm-base", self.tok.model_path)
        self.rm = prepare_reward_model(base, config)
        self.rm_result = fit_reward_model(
            self.rm, encode_pairs(self.tok, pairs(self.rm_train, 2)),
            encode_pairs(self.tok, pairs(self.rm_valid, 3)), config, log=lambda s: None)
        self.rm_dir = save_reward_model(self.rm, root / "rm", base_model=root / "rm-base",
                                        fine_tune_type="full", extra={"margin": "small"})

        # The starting policy: full fine-tune on noisy answers.
        policy = make_model(seed=0, **SMALL)
        records = [{"prompt": p, "completion": w if rng.random() < 0.35 else distractor(w)}
                   for p, w in rng.sample(combos, 256)]
        batches = SFTBatches([tokenize_record(r, self.tok) for r in records], 16, 64, pack=False)
        train(policy, sft_loss, batches,
              TrainConfig(lr=1e-2, epochs=6, betas=(0.9, 0.95), weight_decay=0.0, progress=False,
                          val_every=0, save_every=0), log=lambda s: None)
        self.policy_dir = save_model(policy, root / "policy", self.tok.model_path)
        self.policy = policy

    def greedy_correct(self, model, split) -> float:
        outs = batch_generate(model, self.tok, [self.tok.encode_chat(user(p)) for p, _ in split],
                              GenerationConfig(max_tokens=4))
        return sum(self.tok.decode(o).strip() == w for o, (_, w) in zip(outs, split)) / len(split)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return Task(tmp_path_factory.mktemp("rlhf-task"))


def rs_config(seed=0, k=K):
    return RSConfig(k=k, generation=GenerationConfig(max_tokens=4, temp=1.0, seed=seed))


# --------------------------------------------------------------------------- the proof


def test_reward_model_reaches_high_held_out_accuracy(task):
    final = task.rm_result.final
    assert final.n == 64
    assert final.accuracy >= 0.9, final.summary()
    assert final.mean_gap > 1.0
    # The saved folder scores exactly like the trained model.
    rm, _ = load_reward_model(task.rm_dir)
    seq = task.tok.chat_segments(user(task.held[0][0]) + [{"role": "assistant", "content": "six"}])
    ids = mx.array([[i for s, _ in seq for i in s]])
    n = mx.array([ids.shape[1]])
    assert abs(rm(ids, n).item() - task.rm(ids, n).item()) < 1e-5


def test_best_of_k_picks_correct_answers_more_often_than_one_sample(task):
    report = rejection_sample(task.policy, task.tok, task.rm, task.tok,
                              [user(p) for p, _ in task.rs], rs_config(), progress=False)
    answers = [w for _, w in task.rs]
    single = sum(r.texts.count(w) / K for r, w in zip(report.results, answers)) / len(answers)
    first = sum(r.texts[0] == w for r, w in zip(report.results, answers)) / len(answers)
    best = sum(r.texts[r.best] == w for r, w in zip(report.results, answers)) / len(answers)
    assert single < 0.5 and first < 0.5  # the policy is mostly wrong ...
    assert best >= 0.85 and best >= single + 0.4  # ... and best-of-8 mostly right
    assert report.mean_best > report.mean_median + 1.0  # the paper's max-vs-median gap
    assert report.unfinished == 0


def test_rs_loop_iteration_raises_the_policys_held_out_reward(task, tmp_path):
    """One iteration of `llama2 rs-loop` (reward model and policy loaded from disk)."""
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in task.rs))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in task.held))
    (tmp_path / "sft.yaml").write_text("lr: 1.0e-3\nepochs: 4\nbatch_size: 16\npack: false\n"
                                       "max_seq_length: 64\nrank: 4\nsave_every: 0\n")
    out = tmp_path / "loop"
    r = runner.invoke(app, [
        "rs-loop", "--model", str(task.policy_dir), "--reward-model", str(task.rm_dir),
        "--prompts", str(tmp_path / "prompts.jsonl"), "--eval-prompts", str(tmp_path / "held.jsonl"),
        "--iterations", "1", "-k", str(K), "--temp", "1.0", "--max-tokens", "4",
        "--sft-config", str(tmp_path / "sft.yaml"), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in summary] == [0, 1]
    before, after = summary[0]["mean_greedy_reward"], summary[1]["mean_greedy_reward"]
    assert after > before + 1.0, summary
    assert summary[1]["mean_best_reward"] > summary[1]["mean_median_reward"]
    assert "iteration 1: mean best reward" in r.stdout
    # The policy itself now answers correctly on held-out prompts.
    start = task.greedy_correct(load(task.policy_dir)[0], task.held)
    tuned = task.greedy_correct(load(task.policy_dir, adapter_path=out / "iter_01" / "adapters")[0],
                                task.held)
    assert tuned >= start + 0.5, (start, tuned)
    # The iteration's data: winners that lora-train reads directly, and all K samples.
    it = out / "iter_01"
    assert len(load_samples(it / "winners.jsonl", task.tok)) == len(task.rs)
    rec = json.loads((it / "samples.jsonl").read_text().splitlines()[0])
    assert len(rec["samples"]) == K and {"text", "reward", "finished"} <= set(rec["samples"][0])


# --------------------------------------------------------------------------- mechanics


def test_sampling_prefills_the_prompt_once_and_decodes_k_rows_as_a_batch(task):
    shapes = []

    class Spy:
        def __init__(self, model):
            self.model, self.training = model, model.training
            self.layers = model.layers

        def __call__(self, tokens, cache=None, mask=None):
            shapes.append(tuple(tokens.shape))
            return self.model(tokens, cache=cache, mask=mask)

        def eval(self):
            return self

        def train(self, mode=True):
            return self

    prompt = user(task.rs[0][0])
    P = len(task.tok.encode_chat(prompt))
    report = rejection_sample(Spy(task.policy), task.tok, task.rm, task.tok, [prompt],
                              rs_config(k=5), progress=False)
    assert shapes[0] == (1, P - 1)  # one batch-1 prefill
    assert all(s == (5, 1) for s in shapes[1:]) and len(shapes) > 1  # K rows per decode step
    assert len(report.results[0].texts) == 5


def test_pick_best_prefers_answers_that_finished_and_answers_end_at_chat_tags():
    assert _pick_best([0.1, 5.0, 0.3], [True, False, True]) == 2
    assert _pick_best([0.1, 5.0, 0.3], [False, False, False]) == 1

    class Text:  # ids that decode to themselves
        decode = staticmethod(lambda text: text)

    assert _answer(Text, " four [INST] more") == ("four", True)
    assert _answer(Text, " four ") == ("four", False)


def test_rejection_sample_cli_writes_lora_train_records(task, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": user(task.rs[0][0])}) + "\n"
                       + json.dumps(task.rs[1][0]) + "\n")
    out, all_out = tmp_path / "best.jsonl", tmp_path / "all.jsonl"
    r = runner.invoke(app, [
        "rejection-sample", "--model", str(task.policy_dir), "--reward-model", str(task.rm_dir),
        "--prompts", str(prompts), "-k", "4", "--max-tokens", "4", "--seed", "3",
        "--out", str(out), "--all-out", str(all_out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "mean best reward" in r.stdout and "mean median reward" in r.stdout
    best = [json.loads(line) for line in out.read_text().splitlines()]
    every = [json.loads(line) for line in all_out.read_text().splitlines()]
    assert len(best) == len(every) == 2
    for b, a in zip(best, every):
        assert b["messages"][-1]["role"] == "assistant"
        assert b["reward"] == max(s["reward"] for s in a["samples"])
        assert b["messages"][-1]["content"] == a["samples"][a["best"]]["text"]
    assert len(load_samples(out, task.tok)) == 2  # lora-train reads it as is


def test_rs_loop_pools_the_winners_of_all_iterations_and_continues_start_adapters(task, tmp_path):
    from llama2_mlx.models.lora import read_adapter_config
    from llama2_mlx.rlhf.rejection import load_models
    from llama2_mlx.rlhf.rs_loop import finetune

    # A starting policy with its own (rank 2) adapters.
    (tmp_path / "seed.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "completion": w}) + "\n" for p, w in task.rs[:4]))
    model, tok = load(task.policy_dir)
    opts = SFTOptions(lora=LoRAConfig(rank=2), train=TrainConfig(iters=1, save_every=0, progress=False),
                      data=DataConfig(batch_size=4, pack=False, max_seq_length=64))
    finetune(model, tok, tmp_path / "seed.jsonl", tmp_path / "start", opts, log=lambda s: None)
    base, lora_config, rm, _ = load_models(task.policy_dir, tmp_path / "start", task.rm_dir, None,
                                           log=lambda s: None)
    assert lora_config.rank == 2
    assert not base.shared_by(rm)  # the reward model was trained on another base

    def load_policy(adapters=None):
        return base.policy(adapters or tmp_path / "start")

    prompts = [user(p) for p, _ in task.rs[:4]]
    config = RSLoopConfig(iterations=2, rs=rs_config(k=2),
                          sft=SFTOptions(train=TrainConfig(iters=1, save_every=0, progress=False),
                                         data=DataConfig(batch_size=4, pack=False, max_seq_length=64)))
    summaries = rs_loop(load_policy, rm, task.tok, prompts, tmp_path / "loop", config,
                        lora_config=lora_config, log=lambda s: None)
    assert [s.iteration for s in summaries] == [0, 1, 2]
    it1, it2 = tmp_path / "loop" / "iter_01", tmp_path / "loop" / "iter_02"
    w1, w2 = (it1 / "winners.jsonl").read_text(), (it2 / "winners.jsonl").read_text()
    assert (it2 / "train.jsonl").read_text() == w1 + w2  # pooled, not just the last iteration
    assert summaries[2].pool_size == 8
    # The start adapters were trained further (same rank), loadable on the base model.
    assert read_adapter_config(it2 / "adapters")[1].rank == 2
    load(task.policy_dir, adapter_path=it2 / "adapters")
    # Every iteration's fresh policy was a twin: the shared base is still untouched.
    np.testing.assert_array_equal(np.array(base.model(mx.array([[1, 2, 3]]))),
                                  np.array(load(task.policy_dir)[0](mx.array([[1, 2, 3]]))))


def test_read_prompts_formats_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([
        json.dumps("bare string"),
        json.dumps({"prompt": "hi", "system": "be brief"}),
        json.dumps({"messages": user("q") + [{"role": "assistant", "content": "a"}]}),
        json.dumps({"prompt": "x", "completion": "y"}),
    ]) + "\n")
    got = read_prompts(f)
    assert got[0] == user("bare string")
    assert got[1] == [{"role": "system", "content": "be brief"}] + user("hi")
    assert got[2] == user("q") and got[3] == user("x")
    f.write_text(json.dumps({"prompt": "ok"}) + "\n" + "{oops\n")
    with pytest.raises(Llama2Error, match=r"p.jsonl line 2: invalid JSON"):
        read_prompts(f)
    f.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(Llama2Error, match=r"p.jsonl: not UTF-8 text"):
        read_prompts(f)
    f.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(Llama2Error, match=r"p.jsonl line 1: needs a 'prompt' or 'messages'"):
        read_prompts(f)


def test_rejection_sample_cli_reports_bad_input_in_one_line(task, tmp_path):
    r = runner.invoke(app, [
        "rejection-sample", "--model", str(task.policy_dir), "--reward-model", str(tmp_path),
        "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_rs_loop_resume_gives_the_uninterrupted_run_and_refuses_other_settings(task, tmp_path):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in task.rs[:6]))

    def loop(out, iterations, *extra):
        return runner.invoke(app, [
            "rs-loop", "--model", str(task.policy_dir), "--reward-model", str(task.rm_dir),
            "--prompts", str(tmp_path / "prompts.jsonl"), "--iterations", str(iterations),
            "-k", "2", "--max-tokens", "4", "--iters", "2", "--batch-size", "4",
            "--max-seq-length", "64", "--rank", "2", "--out", str(out), "--no-progress", *extra])

    def summary(out):
        return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert loop(straight, 2).exit_code == 0
    assert loop(stopped, 1).exit_code == 0
    # Without --resume an earlier run is never overwritten.
    r = loop(stopped, 2)
    assert r.exit_code == 2 and "--resume continues it" in r.stderr and len(summary(stopped)) == 2
    # Other settings are refused, naming the one that changed.
    r = loop(stopped, 2, "--resume", "--temp", "0.5")
    assert r.exit_code == 2 and "generation.temp was 1.0, now 0.5" in r.stderr
    r = loop(stopped, 2, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming" in r.stderr and "after iteration 1" in r.stderr
    a, b = summary(straight), summary(stopped)
    assert [s["iteration"] for s in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert x["pool_size"] == y["pool_size"]
        for key in ("mean_greedy_reward", "mean_best_reward", "mean_median_reward"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key
    for name in ("winners.jsonl", "train.jsonl"):
        assert (straight / "iter_02" / name).read_text() == (stopped / "iter_02" / name).read_text()
    # metrics.jsonl: the fine-tunes' steps and one record an iteration, none twice
    def metrics(out):
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["kind"], r.get("iteration"), r["step"]) for r in recs]

    assert metrics(stopped) == metrics(straight)
    assert [m for m in metrics(straight) if m[0] == "iteration"] == [
        ("iteration", i, i) for i in range(3)]
    assert [m[2] for m in metrics(straight) if m[:2] == ("train", 2)] == [1, 2]
    if importlib.util.find_spec("matplotlib"):
        r = runner.invoke(app, ["plot", str(stopped)])
        assert r.exit_code == 0 and (stopped / "loss.png").stat().st_size > 10_000, r.output
    r = runner.invoke(app, ["rs-loop", "--model", str(task.policy_dir), "--reward-model",
                            str(task.rm_dir), "--prompts", str(tmp_path / "prompts.jsonl"),
                            "--out", str(tmp_path / "nothing"), "--resume"])
    assert r.exit_code == 2 and "holds no rs-loop run" in r.stderr
    # A summary.jsonl with a record of the wrong shape: one line naming file and line.
    lines = (stopped / "summary.jsonl").read_text().splitlines()
    (stopped / "summary.jsonl").write_text("\n".join(
        [lines[0], lines[1].replace('"pool_size"', '"pool_sise"'), *lines[2:]]) + "\n")
    r = loop(stopped, 3, "--resume")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: {stopped / 'summary.jsonl'} line 2: the record has an unknown key 'pool_sise'"]
    # --overwrite replaces the run (kept until its first fine-tuned iteration).
    r = loop(stopped, 1, "--overwrite")
    assert r.exit_code == 0, r.output
    assert [s["iteration"] for s in summary(stopped)] == [0, 1]
    assert not (stopped / "iter_02").exists() and not (stopped / ".previous-run").exists()
