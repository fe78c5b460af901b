"""The reward model: data and margins, reading the reward at the last real token, the
loss, metrics, the saved folder, and the reward-train / reward-eval / reward-score CLI.
(The proof that it learns a synthetic task is in test_rejection.py.)"""

import json
import math
import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_model
from mlx.utils import tree_flatten, tree_map
from typer.testing import CliRunner

from cli.app import app
from llama2_mlx.errors import Llama2Error
from llama2_mlx.models.cache import common_prefix_length
from llama2_mlx.rlhf.reward import RewardTrainConfig, paper_warmup, prepare_reward_model
from llama2_mlx.rlhf.reward_data import (
    MARGINS,
    EncodedPair,
    PairBatch,
    PreferencePair,
    encode_pairs,
    encode_response,
    load_pairs,
    load_reward_data,
    pad_right,
    parse_pair,
)
from llama2_mlx.rlhf.reward_model import (
    RewardModel,
    evaluate,
    load_reward_model,
    metrics_from_rewards,
    pairwise_loss,
    reward_loss,
    save_reward_model,
    score_responses,
    score_sequences,
    score_shared_prefix,
)

runner = CliRunner()
RATED = ["significantly_better", "better", "slightly_better", "negligibly_better"]



def user(text):
    return [{"role": "user", "content": text}]


def write_pairs(path, n, seed=0):
    rng = random.Random(seed)
    words = "one two three four five six seven eight".split()
    with open(path, "w") as f:
        for i in range(n):
            w = rng.choice(words)
            rec = {"prompt": f"please spell {w}", "chosen": w,
                   "rejected": rng.choice([x for x in words if x != w]), "rating": RATED[i % 4]}
            f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------- data


def test_margins_follow_table_27():
    assert MARGINS["small"] == dict(zip(RATED, (1, 2 / 3, 1 / 3, 0)))
    assert MARGINS["large"] == dict(zip(RATED, (3, 2, 1, 0)))
    rec = {"prompt": "q", "chosen": "a", "rejected": "b", "rating": "Slightly Better"}
    assert parse_pair(rec).margin == pytest.approx(1 / 3)
    assert parse_pair(rec, margin="large").margin == 1.0
    assert parse_pair(rec, margin="none").margin == 0.0
    assert parse_pair(rec).rating == "slightly_better"
    assert parse_pair({**rec, "rating": "unsure"}).rating == "negligibly_better"
    # An explicit margin is used as given; none means no margin at all.
    assert parse_pair({**rec, "margin": 0.25}, margin="large").margin == 0.25
    assert parse_pair({**rec, "margin": 0.25}, margin="none").margin == 0.0
    assert parse_pair({"prompt": "q", "chosen": "a", "rejected": "b"}).margin == 0.0


def test_prompts_as_text_system_or_messages():
    p = parse_pair({"prompt": "hi", "system": "be brief", "chosen": "a", "rejected": "b"})
    assert p.prompt == [{"role": "system", "content": "be brief"}] + user("hi")
    dialog = user("q1") + [{"role": "assistant", "content": "a1"}] + user("q2")
    assert parse_pair({"messages": dialog, "chosen": "a", "rejected": "b"}).prompt == dialog
    assert parse_pair({"prompt": dialog, "chosen": "a", "rejected": "b"}).prompt == dialog


@pytest.mark.parametrize("line, msg", [
    ('{"prompt": "q", "chosen": "a"', "invalid JSON"),
    ('{"prompt": "q", "chosen": "a"}', "'rejected' must be a non-empty string"),
    ('{"chosen": "a", "rejected": "b"}', "needs a 'prompt' or 'messages'"),
    ('{"prompt": "q", "chosen": "a", "rejected": " a "}', "are the same response"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "rating": "great"}', "'rating' must be one of"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1"}', "'margin' must be a finite number"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], '
     '"chosen": "a", "rejected": "b"}', "last message must be from the user"),
    ('{"prompt": "[INST] q", "chosen": "a", "rejected": "b"}', "reserved tag"),
])
def test_bad_pairs_are_one_line_errors_with_file_and_line(tmp_path, line, msg):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n\n' + line + "\n")
    with pytest.raises(Llama2Error, match=msg) as e:
        load_pairs(f)
    assert str(e.value).startswith(f"{f} line 3") and "\n" not in str(e.value)


def test_held_out_split(tmp_path):
    write_pairs(tmp_path / "train.jsonl", 40)
    train, valid = load_reward_data(tmp_path)
    assert (len(train), len(valid)) == (38, 2)  # 5% held out when there is no valid.jsonl
    write_pairs(tmp_path / "valid.jsonl", 5, seed=1)
    train, valid = load_reward_data(tmp_path)
    assert (len(train), len(valid)) == (40, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Llama2Error, match="no train.jsonl"):
        load_reward_data(tmp_path / "empty")


def test_sequence_is_the_chat_encoding_with_eos(tok):
    prompt = user("spell fox")
    ids = encode_response(tok, prompt, " fox ")
    assert ids == tok.encode("[INST] spell fox [/INST] fox ", bos=True, eos=True)
    assert ids[-1] == tok.eos_id
    assert encode_response(tok, prompt, "fox", max_len=5) == ids[-5:]  # the end is kept


# --------------------------------------------------------------------------- model and loss


def test_reward_is_read_at_the_last_real_token_never_at_padding():
    rm = RewardModel.from_policy(make_model())
    rng = np.random.RandomState(0)
    seqs = [rng.randint(3, 500, n).tolist() for n in (7, 3, 11)]
    alone = [rm(mx.array([s]), mx.array([len(s)])).item() for s in seqs]
    tokens, lengths = pad_right(seqs)
    batched = rm(tokens, lengths).tolist()
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    # Whatever the padding holds, the rewards stay.
    noisy = mx.where(mx.arange(tokens.shape[1])[None] < lengths[:, None], tokens,
                     mx.array(rng.randint(3, 500, tokens.shape)))
    np.testing.assert_allclose(rm(noisy, lengths).tolist(), alone, atol=1e-5)
    # It is the head on the final-norm hidden state of the last token.
    h = rm.model(mx.array([seqs[0]]))[:, -1]
    assert rm.score(h).item() == pytest.approx(alone[0], abs=1e-5)
    assert "lm_head" not in dict(tree_flatten(rm.parameters()))


def test_shared_prefix_scoring_equals_scoring_each_sequence():
    rm = RewardModel.from_policy(make_model())
    rng = np.random.RandomState(1)
    prompt = rng.randint(3, 500, 20).tolist()
    seqs = [prompt + rng.randint(3, 500, n).tolist() for n in (1, 6, 3)]
    np.testing.assert_allclose(score_shared_prefix(rm, seqs), score_sequences(rm, seqs), atol=1e-5)
    many = seqs + [prompt + rng.randint(3, 500, n).tolist() for n in (2, 5)]
    # In chunks of 2 (the prompt is still prefilled once), order kept.
    np.testing.assert_allclose(score_shared_prefix(rm, many, batch_size=2),
                               score_sequences(rm, many), atol=1e-5)
    assert common_prefix_length(seqs) >= 20
    nested = [prompt[:4], prompt[:9]]  # one is a prefix of the other
    np.testing.assert_allclose(score_shared_prefix(rm, nested), score_sequences(rm, nested), atol=1e-5)


def test_pairwise_loss_is_paper_eq_2():
    rc, rr, m = mx.array([2.0, 0.0, -1.0]), mx.array([1.0, 0.5, 3.0]), mx.array([0.0, 1 / 3, 3.0])
    want = [-math.log(1 / (1 + math.exp(-(c - r - mm))))
            for c, r, mm in zip(rc.tolist(), rr.tolist(), m.tolist())]
    np.testing.assert_allclose(pairwise_loss(rc, rr, m).tolist(), want, rtol=1e-5)
    big = pairwise_loss(mx.array([100.0, -100.0]), mx.array([0.0, 0.0]))
    assert big.tolist()[0] == pytest.approx(0.0, abs=1e-6) and big.tolist()[1] == pytest.approx(100.0)
    # A margin demands a larger gap: the same rewards lose more.
    assert pairwise_loss(mx.array(1.0), mx.array(0.0), 1.0).item() > pairwise_loss(
        mx.array(1.0), mx.array(0.0)).item()


def test_lora_reward_model_trains_only_adapters_and_head(tok):
    config = RewardTrainConfig(fine_tune_type="lora")
    rm = prepare_reward_model(make_model(), config)
    trainable = [k for k, _ in tree_flatten(rm.trainable_parameters())]
    assert "score.weight" in trainable
    assert all(k == "score.weight" or k.endswith(("lora_a", "lora_b")) for k in trainable)
    pairs = encode_pairs(tok, [PreferencePair(user("spell dog"), "dog", "cat", 2 / 3),
                               PreferencePair(user("spell fox"), "fox", "the fox jumps")])
    batch = PairBatch.from_pairs(pairs)
    assert batch.tokens.shape[0] == 4 and batch.margins.tolist() == pytest.approx([2 / 3, 0])
    (loss, n), grads = nn.value_and_grad(rm, reward_loss)(rm, batch)
    assert n.item() == 2
    r = rm(batch.tokens, batch.lengths)
    assert loss.item() == pytest.approx(pairwise_loss(r[:2], r[2:], batch.margins).sum().item())
    flat = dict(tree_flatten(grads))
    assert mx.abs(flat["score.weight"]).sum().item() > 0
    full = prepare_reward_model(make_model(), RewardTrainConfig(fine_tune_type="full"))
    assert len(tree_flatten(full.trainable_parameters())) == len(tree_flatten(full.parameters()))


def test_metrics_accuracy_gap_and_per_rating():
    m = metrics_from_rewards([1.0, 2.0, 0.0, 5.0], [0.0, 3.0, 0.0, 1.0],
                             ratings=["better", "better", "slightly_better", None])
    assert m.accuracy == 0.5  # a tie is not a win
    assert m.mean_gap == pytest.approx((1 - 1 + 0 + 4) / 4)
    assert m.per_rating == {"better": (0.5, 2), "slightly_better": (0.0, 1), "unrated": (1.0, 1)}
    assert "better 0.500 (n=2)" in m.summary()
    assert metrics_from_rewards([1.0], [0.0]).per_rating == {}


def test_paper_warmup_is_3_percent_at_least_5():
    assert paper_warmup(1000) == 30 and paper_warmup(100) == 5 and paper_warmup(3) == 2


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_saved_folder_scores_the_same(tmp_path, model_dir, tok, kind):
    from llama2_mlx.checkpoints.load import load

    rm = prepare_reward_model(load(model_dir)[0], RewardTrainConfig(fine_tune_type=kind), seed=3)
    # Move every trainable weight away from its initial value.
    rm.update(tree_map(lambda p: p + 0.01, rm.trainable_parameters()))
    prompts, answers = [user("spell dog"), user("count two")], ["dog", "one two"]
    want = score_responses(rm, tok, prompts, answers)
    out = save_reward_model(rm, tmp_path / "rm", base_model=model_dir, fine_tune_type=kind,
                            lora_config=RewardTrainConfig().lora)
    names = {p.name for p in out.iterdir()}
    assert {"reward_config.json", "head.safetensors"} <= names
    assert ({"adapter_config.json", "adapters.safetensors"} if kind == "lora"
            else {"backbone.safetensors"}) <= names
    loaded, tok2 = load_reward_model(out)
    np.testing.assert_allclose(score_responses(loaded, tok2, prompts, answers), want, atol=1e-5)
    assert rm.max_len == loaded.max_len == RewardTrainConfig().max_seq_len  # one truncation length
    mx.save_safetensors(str(out / "head.safetensors"), {"score.weight": mx.zeros((1, 3))})
    with pytest.raises(Llama2Error, match=r"head.safetensors: tensor score.weight has shape \(1, 3\)"):
        load_reward_model(out)


def test_evaluate_counts_pairs(tok):
    rm = RewardModel.from_policy(make_model())
    pairs = [EncodedPair(encode_response(tok, user("q"), "a"), encode_response(tok, user("q"), "b"))]
    m = evaluate(rm, pairs)
    assert m.n == 1 and m.accuracy in (0.0, 1.0)


# --------------------------------------------------------------------------- CLI


def test_reward_train_eval_score_cli(tmp_path, model_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_pairs(data / "train.jsonl", 24)
    write_pairs(data / "valid.jsonl", 8, seed=1)
    out = tmp_path / "rm"
    r = runner.invoke(app, ["reward-train", "--model", str(model_dir), "--data", str(data),
                            "--out", str(out), "--iters", "3", "--batch-size", "4", "--rank", "2",
                            "--lr", "1e-3", "--margin", "large", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "held-out acc" in r.stdout and "significantly_better" in r.stdout
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["fine_tune_type"] == "lora" and adapter_cfg["lora_parameters"]["rank"] == 2
    keys = mx.load(str(out / "adapters.safetensors"))
    assert all(k.startswith("model.layers.") and k.endswith(("lora_a", "lora_b")) for k in keys)
    cfg = json.loads((out / "reward_config.json").read_text())
    assert cfg["margin"] == "large" and cfg["step"] == 3 and cfg["metrics"]["n"] == 8
    assert (out / "checkpoints").is_dir()

    r = runner.invoke(app, ["reward-eval", "--reward-model", str(out), "--data", str(data)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("accuracy ") and lines[1].startswith("mean reward gap ")
    assert f"accuracy {cfg['metrics']['accuracy']:.4f}" == lines[0]
    assert any(line.startswith("accuracy better ") for line in lines)

    scored = tmp_path / "scored.jsonl"
    (tmp_path / "resp.jsonl").write_text(
        json.dumps({"prompt": "please spell two", "response": "two"}) + "\n"
        + json.dumps({"messages": user("please spell six") + [{"role": "assistant", "content": "one"}]}) + "\n")
    r = runner.invoke(app, ["reward-score", "--reward-model", str(out), "--data",
                            str(tmp_path / "resp.jsonl"), "--out", str(scored)])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in scored.read_text().splitlines()]
    rm, tok = load_reward_model(out)
    want = score_responses(rm, tok, [user("please spell two"), user("please spell six")], ["two", "one"])
    np.testing.assert_allclose([x["reward"] for x in recs], want, atol=1e-5)
    assert recs[0]["response"] == "two"


def test_reward_cli_bad_data_is_one_line_error(tmp_path, model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": 1}\n')
    r = runner.invoke(app, ["reward-train", "--model", str(model_dir), "--data", str(data),
                            "--out", str(tmp_path / "rm")])
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {data / 'train.jsonl'} line 2: ") and r.stderr.count("\n") == 1
    r = runner.invoke(app, ["reward-score", "--reward-model", str(tmp_path), "--data",
                            str(data / "train.jsonl"), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and "train.jsonl line 1: needs a 'response'" in r.stderr


def test_a_data_path_too_long_for_the_system_is_one_error_line(tmp_path):
    """``Path.is_dir`` raises ENAMETOOLONG on a 5000-character name (issue 10): the data
    readers ask ``io.readers`` instead, and the user gets the reader's one line."""
    from llama2_mlx.errors import Llama2Error
    from llama2_mlx.rlhf.reward_data import load_reward_data

    with pytest.raises(Llama2Error):
        load_reward_data(tmp_path / ("a" * 5000))
