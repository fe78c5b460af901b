"""JSONL formats, answer-only targets, data errors, long samples, packing vs padding."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model, target_runs

from llama2_mlx.errors import Llama2Error
from llama2_mlx.training.data import (
    Sample,
    SFTBatches,
    fit_length,
    load_samples,
    tokenize_record,
)
from llama2_mlx.training.sft import sft_loss, token_losses


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_prompt_completion_trains_only_the_answer_and_its_eos(tok):
    s = tokenize_record({"prompt": "what is one plus two", "completion": "three"}, tok)
    full = tok.encode_chat([{"role": "user", "content": "what is one plus two"}])
    assert s.tokens[: len(full)] == full  # BOS [INST] prompt [/INST], all prompt
    assert not any(s.targets[: len(full)])
    (run,) = target_runs(s)
    assert run[-1] == tok.eos_id and tok.decode(run[:-1]).strip() == "three"
    assert s.tokens[-1] == tok.eos_id and s.targets[-1]


def test_multi_turn_trains_every_assistant_turn(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "count"}, {"role": "assistant", "content": "one two three"},
    ]
    s = tokenize_record({"messages": msgs}, tok)
    runs = target_runs(s)
    assert [tok.decode(r[:-1]).strip() for r in runs] == ["hello world", "one two three"]
    assert all(r[-1] == tok.eos_id for r in runs)
    assert s.tokens == [i for ids, _ in tok.chat_segments(msgs) for i in ids]
    assert s.tokens.count(tok.bos_id) == 2 and not s.targets[s.tokens.index(tok.bos_id, 1)]


def test_text_records_train_every_token(tok):
    s = tokenize_record({"text": "the quick brown fox"}, tok)
    assert s.tokens[0] == tok.bos_id and s.tokens[-1] == tok.eos_id
    assert s.num_targets == len(s) - 1


@pytest.mark.parametrize("line, msg", [
    ('{"prompt": "a", "completion": "b"', r"line 2: invalid JSON"),
    ('{"prompt": "a"}', r"line 2: has no 'completion'"),
    ('{"question": "a"}', r"line 2: needs 'prompt' and 'completion', 'messages' or 'text'"),
    ('[1, 2]', r"line 2: expected a JSON object"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), r"line 2: roles must alternate"),
    (json.dumps({"prompt": "[INST] hi", "completion": "b"}), r"line 2: .*reserved tag '\[INST\]'"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"line 2: no assistant answer"),
    (json.dumps({"text": 5}), r"line 2: 'text' must be a string"),
])
def test_bad_records_name_file_and_line(tok, tmp_path, line, msg):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}, line])
    with pytest.raises(Llama2Error, match="train.jsonl " + msg):
        load_samples(path, tok)


def test_empty_file_is_an_error(tok, tmp_path):
    (tmp_path / "valid.jsonl").write_text("\n")
    with pytest.raises(Llama2Error, match=r"valid.jsonl: empty file"):
        load_samples(tmp_path / "valid.jsonl", tok)


def test_long_samples_are_reported_never_silently_cut():
    samples = [Sample(list(range(1, 11)), [False] * 5 + [True] * 5, "f line 1"),
               Sample([1, 2, 3], [False, True, True], "f line 2"),
               Sample(list(range(1, 11)), [False] * 9 + [True], "f line 3")]
    with pytest.raises(Llama2Error, match=r"f line 1: sample of 10 tokens is longer than max_seq_length 6 \+ 1; pass long_samples truncate or skip"):
        fit_length(samples, 6)
    kept, report = fit_length(samples, 6, "truncate")
    assert [len(s) for s in kept] == [7, 3] and kept[0].targets == [False] * 5 + [True] * 2
    assert report.dropped == ["f line 3"]  # its only answer token was cut off
    assert "2 sample(s) longer than 7 tokens truncated (first: f line 1)" in report.message("f", 7)
    kept, report = fit_length(samples, 6, "skip")
    assert [s.where for s in kept] == ["f line 2"] and len(report.long) == 2


def random_samples(n, seed=0, lo=4, hi=20):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        L = rng.randint(lo, hi)
        p = rng.randint(1, L - 1)
        out.append(Sample([1] + rng.randint(3, 500, L - 1).tolist(), [False] * p + [True] * (L - p), f"s{i}"))
    return out


def test_packing_fills_rows_with_a_block_diagonal_mask_and_no_padding_targets():
    samples = random_samples(30)
    b = SFTBatches(samples, batch_size=3, max_seq_length=40, pack=True, seed=0)
    stats = b.stats()
    assert stats.targets == sum(s.num_targets for s in samples)
    assert stats.fill > 0.85
    seen = []
    for batch in b(0):
        w = np.array(batch.weights)
        inputs = np.array(batch.inputs)
        assert batch.num_targets == int(w.sum())
        mask = np.array(batch.mask)[:, 0]
        for r in range(inputs.shape[0]):
            assert np.all(np.triu(mask[r], 1) == 0)  # causal
        seen.append(batch.num_targets)
    assert sum(seen) == stats.targets  # every sample once per epoch
    # Epochs differ in order, and are reproducible.
    first = [np.array(x.inputs).tolist() for x in b(0)]
    assert first == [np.array(x.inputs).tolist() for x in b(0)]
    assert first != [np.array(x.inputs).tolist() for x in b(1)]


@pytest.mark.parametrize("pack", [True, False])
def test_packed_and_padded_token_losses_equal_one_by_one(pack):
    """RoPE is relative, so with the block-diagonal mask each packed sample gets exactly
    the per-token losses it gets alone."""
    check_batches_equal_one_by_one(random_samples(9, seed=1), pack, max_seq_length=48)


def gatt_dialog(turns, trained_last_only=True):
    """A multi-turn dialog; with ``trained_last_only`` every answer but the last says
    ``"train": false`` (Ghost Attention's records)."""
    msgs = []
    for i in range(turns):
        msgs.append({"role": "user", "content": f"count {i} please" + (" in french" if i == 0 else "")})
        answer = {"role": "assistant", "content": " ".join(["one", "two", "three"][: i % 3 + 1])}
        if trained_last_only and i < turns - 1:
            answer["train"] = False
        msgs.append(answer)
    return msgs


@pytest.mark.parametrize("pack", [True, False])
def test_packed_and_padded_losses_equal_one_by_one_with_untrained_turns(tok, pack):
    """The same exactness with "train": false answers mixed in: they are context only."""
    samples = [tokenize_record({"messages": gatt_dialog(t, flag)}, tok, f"d{t}{flag}")
               for t in (1, 2, 3) for flag in (True, False)]
    assert any(s.num_targets < t.num_targets for s, t in zip(samples[::2], samples[1::2])
               if len(s) == len(t))
    check_batches_equal_one_by_one(samples + random_samples(5, seed=4), pack, max_seq_length=128)


def check_batches_equal_one_by_one(samples, pack, max_seq_length):
    model = make_model()
    b = SFTBatches(samples, batch_size=2, max_seq_length=max_seq_length, pack=pack, seed=3)
    alone = []
    for s in samples:
        logits = model(mx.array([s.tokens[:-1]]))[0]  # (n, vocab)
        target = mx.array(s.tokens[1:])[:, None]
        ce = mx.logsumexp(logits, -1) - mx.take_along_axis(logits, target, -1)[:, 0]
        alone.append(np.array(ce) * np.array(s.targets[1:], np.float32))
    epoch = b(0)
    worst, total, count = 0.0, 0.0, 0
    for k, group in enumerate(epoch.groups):
        batch = epoch[k]
        got = np.array(token_losses(model, batch))  # (B, T)
        for r, row in enumerate(group):
            pos = 0
            for i in b.rows[row]:  # the row's samples, in order
                n = len(alone[i])
                worst = max(worst, float(np.abs(got[r, pos : pos + n] - alone[i]).max()))
                pos += n
            assert not got[r, pos:].any()  # padding: no loss
        s, n = sft_loss(model, batch)  # the gathered-logits loss of training
        np.testing.assert_allclose(s.item(), float(got.sum()), rtol=1e-5)
        total, count = total + s.item(), count + int(n.item())
    if pack:
        assert any(len(b.rows[r]) > 1 for g in epoch.groups for r in g)
    print(f"max |packed - one-by-one| per-token loss ({'packed' if pack else 'padded'}): {worst:.2e}")
    assert worst < 1e-5
    np.testing.assert_allclose(total, sum(a.sum() for a in alone), rtol=1e-5)
    assert count == sum(s.num_targets for s in samples)


def test_padded_batches_are_sorted_by_length_and_pad_is_never_a_target():
    samples = random_samples(10, seed=2)
    b = SFTBatches(samples, batch_size=4, max_seq_length=30, pack=False, seed=0)
    for batch in b(0):
        w, x = np.array(batch.weights), np.array(batch.inputs)
        lengths = [(row != 0).sum() for row in x]
        assert max(lengths) - min(lengths) <= 16
        assert np.all(w[x == 0] == 0)  # padding (id 0) positions carry no target
        assert batch.mask is None
    assert b.stats().fill < 1.0


def test_train_false_answers_carry_no_loss_only_the_last_answer_and_its_eos(tok):
    msgs = gatt_dialog(3)
    s = tokenize_record({"messages": msgs}, tok)
    everything = tokenize_record({"messages": gatt_dialog(3, trained_last_only=False)}, tok)
    assert s.tokens == everything.tokens  # the flag changes the targets, never the tokens
    (run,) = target_runs(s)
    assert run[-1] == tok.eos_id and tok.decode(run[:-1]).strip() == "one two three"
    # Exactly the last answer segment: the last True run of the unflagged dialog.
    assert run == target_runs(everything)[-1]
    n = len(tok.chat_segments(msgs)[-1][0])
    assert s.targets == [False] * (len(s) - n) + [True] * n
    # "train": true is the default, given or not.
    msgs[1]["train"] = True
    assert len(target_runs(tokenize_record({"messages": msgs}, tok))) == 2


@pytest.mark.parametrize("messages, msg", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": "no"}],
     r"message 1: 'train' must be true or false, got str"),
    ([{"role": "user", "content": "a", "train": False}, {"role": "assistant", "content": "b"}],
     r"message 0 \(user\) has 'train'; only assistant messages take it"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": False}],
     r"no assistant answer to train on \(every assistant turn says \"train\": false\)"),
])
def test_bad_train_flags_name_file_and_line(tok, tmp_path, messages, msg):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"},
                                                  {"messages": messages}])
    with pytest.raises(Llama2Error, match="train.jsonl line 2: " + msg):
        load_samples(path, tok)
