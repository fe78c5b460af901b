"""Ghost Attention (§3.3): the instruction appended to every user turn while sampling,
kept in the first turn only in the record, and the loss on the last answer alone; the
``llama2 gatt`` command end to end on the bundled demo model."""

from __future__ import annotations

import json

import pytest
from conftest import target_runs
from typer.testing import CliRunner

from cli.app import app
from llama2_mlx.demo import default_model_path
from llama2_mlx.errors import Llama2Error
from llama2_mlx.rlhf import gatt as G
from llama2_mlx.training.data import load_samples, tokenize_record

runner = CliRunner()
INSTRUCTION = "Answer in uppercase."


def dialog(n, system=None):
    return G.Dialog([f"Spell the word {w}." for w in ("lemon", "garden", "river", "cat", "dog")[:n]],
                    system)


# --------------------------------------------------------------------------- records and masks


def test_the_record_keeps_the_instruction_in_the_first_turn_and_trains_the_last_answer():
    rec = G.gatt_record(dialog(3, system="be brief"), ["L E M O N", "G A R D E N", "R I V E R"],
                        INSTRUCTION)
    m = rec["messages"]
    assert [x["role"] for x in m] == ["system"] + ["user", "assistant"] * 3
    assert m[1]["content"] == "Spell the word lemon. Answer in uppercase."
    assert [x["content"] for x in m[3::2]] == ["Spell the word garden.", "Spell the word river."]
    assert [x.get("train", True) for x in m[2::2]] == [False, False, True]
    assert "train" not in m[-1] and rec["instruction"] == INSTRUCTION
    one = G.gatt_record(dialog(1), ["L E M O N"], INSTRUCTION)["messages"]
    assert one == [{"role": "user", "content": "Spell the word lemon. Answer in uppercase."},
                   {"role": "assistant", "content": "L E M O N"}]  # one turn: trained


@pytest.mark.parametrize("turns", [1, 2, 5])
def test_only_the_last_answer_and_its_eos_carry_loss(tok, turns):
    answers = [f"answer {i} one two" for i in range(turns)]
    rec = G.gatt_record(dialog(turns, system="s"), answers, "please count")
    s = tokenize_record(rec, tok)
    (run,) = target_runs(s)
    assert run[-1] == tok.eos_id and tok.decode(run[:-1]).strip() == answers[-1]
    # Exactly the last chat segment (the last answer + EOS): every earlier token, the
    # earlier answers included, has no loss.
    last = tok.chat_segments(rec["messages"])[-1][0]
    assert s.targets == [False] * (len(s) - len(last)) + [True] * len(last)
    assert s.tokens[-len(last):] == last
    assert s.tokens == [i for ids, _ in tok.chat_segments(rec["messages"]) for i in ids]


def test_dialogs_and_instructions_files(tmp_path):
    d = tmp_path / "d.jsonl"
    d.write_text(json.dumps({"messages": [{"role": "system", "content": "s"},
                                          {"role": "user", "content": "a"},
                                          {"role": "user", "content": "b"}]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "a"},
                                            {"role": "assistant", "content": "old"},
                                            {"role": "user", "content": "b"}]}) + "\n")
    got = G.read_dialogs(d)
    assert (got[0].users, got[0].system) == (["a", "b"], "s")
    assert (got[1].users, got[1].system) == (["a", "b"], None)  # assistant turns are resampled
    for bad, msg in [({"prompt": "a"}, "needs 'messages'"), ({"messages": []}, "non-empty list"),
                     ({"messages": [{"role": "user", "content": "[INST] a"}]}, "reserved tag"),
                     ({"messages": [{"role": "system", "content": "s"}]}, "no user turn")]:
        d.write_text(json.dumps(bad) + "\n")
        with pytest.raises(Llama2Error, match=f"d.jsonl line 1: .*{msg}"):
            G.read_dialogs(d)
    t = tmp_path / "i.txt"
    t.write_text("Answer in uppercase.\n\n  End with the word done.  \n")
    assert G.read_instructions(t) == ["Answer in uppercase.", "End with the word done."]
    j = tmp_path / "i.jsonl"
    j.write_text(json.dumps("Be brief.") + "\n" + json.dumps({"instruction": "Act as a pirate."}) + "\n")
    assert G.read_instructions(j) == ["Be brief.", "Act as a pirate."]
    j.write_text(json.dumps({"x": 1}) + "\n")
    with pytest.raises(Llama2Error, match=r"i.jsonl line 1: needs 'instruction'"):
        G.read_instructions(j)
    t.write_text("ok\nsay [/INST]\n")
    with pytest.raises(Llama2Error, match=r"i.txt line 2: contains the reserved tag"):
        G.read_instructions(t)
    t.write_text("\n")
    with pytest.raises(Llama2Error, match="no instructions"):
        G.read_instructions(t)


def test_sampling_appends_the_instruction_to_every_user_turn_turn_by_turn(tok, monkeypatch):
    seen = []

    def fake_sample_k(model, prompt_ids, k, config, eos_id, vocab_size=None):
        seen.append(tok.decode(prompt_ids))
        return [tok.encode(f"ans{len(seen)}", bos=False)] * k, [True] * k

    monkeypatch.setattr(G, "sample_k", fake_sample_k)
    answers = G.sample_dialog(None, tok, G.Dialog(["one", "two", "three"]), "be brief",
                              G.GAttConfig(k=2))
    assert [a.replace(" ", "") for a in answers] == ["ans1", "ans2", "ans3"]
    assert len(seen) == 3
    for t, prompt in enumerate(seen):  # turn t sees every earlier answer, the instruction in every user turn
        assert prompt.count("be brief") == t + 1
        assert all(f"ans{i + 1}" in prompt.replace(" ", "") for i in range(t))
    assert seen[2].endswith("three be brief [/INST]")


# --------------------------------------------------------------------------- the command


def test_gatt_cli_on_the_demo_model_writes_lora_train_records(tmp_path, demo_reward_model):
    from llama2_mlx.chat.tokenizer import Tokenizer

    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q} for q in qs]})
                               + "\n" for qs in [["Spell the word lemon.", "What is 2 + 3?",
                                                  "Spell the word cat."],
                                                 ["What is the capital of France?",
                                                  "How many words are in: cat dog?"]]))
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("Answer in uppercase.\nEnd with the word done.\n")
    out = tmp_path / "gatt"
    args = ["gatt", "--model", str(default_model_path()), "--dialogs", str(dialogs),
            "--instructions", str(instructions), "--out", str(out), "-k", "2", "--max-tokens", "8",
            "--seed", "1", "--no-progress"]
    r = runner.invoke(app, args + ["--reward-model", str(demo_reward_model)])
    assert r.exit_code == 0, r.output
    assert "shares the policy's base weights" in r.stderr and "train.jsonl" in r.stderr
    recs = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [len(x["messages"]) for x in recs] == [6, 4]
    for rec in recs:
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        assert rec["instruction"] in ("Answer in uppercase.", "End with the word done.")
        assert users[0].endswith(" " + rec["instruction"])
        assert not any(rec["instruction"] in u for u in users[1:])
    tok = Tokenizer(default_model_path() / "tokenizer.model")
    samples = load_samples(out / "train.jsonl", tok)  # lora-train reads it as is
    for s, rec in zip(samples, recs):
        last = tok.chat_segments(rec["messages"])[-1][0]
        assert s.num_targets == len(last)
    # The same seed gives the same records; the reward model is optional.
    again = tmp_path / "again"
    r = runner.invoke(app, [*args[:8], str(again), *args[9:], "--reward-model", str(demo_reward_model)])
    assert r.exit_code == 0 and (again / "train.jsonl").read_text() == (out / "train.jsonl").read_text()
    r = runner.invoke(app, args[:8] + [str(tmp_path / "plain")] + args[9:])
    assert r.exit_code == 0, r.output
    # Bad input: one error line naming the file, exit 2.
    r = runner.invoke(app, args[:6] + [str(tmp_path / "missing.txt")] + args[7:])
    assert r.exit_code == 2 and r.stderr == f"error: {tmp_path / 'missing.txt'}: instructions file not found\n"
    r = runner.invoke(app, args + ["-k", "0"])
    assert r.exit_code == 2 and r.stderr.startswith("error: -k must be at least 1")
    # A folder holding records is refused without --overwrite, and kept whole.
    before = (out / "train.jsonl").read_bytes()
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite replaces it" in r.stderr
    assert (out / "train.jsonl").read_bytes() == before
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0
