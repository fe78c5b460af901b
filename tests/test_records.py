"""Chat records: every reader of a dialog file (SFT data, preference pairs, prompts,
responses to score) takes the same shapes by the same rules, with the same errors."""

from __future__ import annotations

import json
import re

import pytest

from llama2_mlx.chat.records import cut_answer, read_prompts, read_records, response_of
from llama2_mlx.errors import Llama2Error
from llama2_mlx.generation.chat import ChatSession
from llama2_mlx.generation.generate import StopStrings
from llama2_mlx.rlhf.reward_data import load_pairs
from llama2_mlx.training.data import load_samples

READERS = {
    "sft": lambda path, tok: load_samples(path, tok),
    "pairs": lambda path, tok: load_pairs(path),
    "prompts": lambda path, tok: read_prompts(path),
    "responses": lambda path, tok: [response_of(r, where) for where, r in read_records(path)],
}
# Every reader's answer fields, so that one record is complete for all of them.
ANSWERS = {"completion": "a", "chosen": "a", "rejected": "b", "response": "a"}
SYSTEM, USER = {"role": "system", "content": "s"}, {"role": "user", "content": "q"}
# The same prompt (a system prompt, then "q") and answer "a" in every shape.
PROMPT_SHAPES = [
    {"prompt": "q", "system": "s", **ANSWERS},
    {"prompt": [SYSTEM, USER], **ANSWERS},
    {"messages": [SYSTEM, USER], **ANSWERS},
]
DIALOG = {"messages": [SYSTEM, USER, {"role": "assistant", "content": "a"}]}


def write(path, *lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def errors(path, tok, readers=READERS):
    """The error of each reader on ``path``."""
    out = {}
    for name in readers:
        with pytest.raises(Llama2Error) as e:
            READERS[name](path, tok)
        out[name] = str(e.value)
    return out


@pytest.mark.parametrize("bad, msg", [
    ({"prompt": "[INST] q"}, r"message 0 \(user\) contains the reserved tag '\[INST\]'"),
    ({"prompt": 5}, r"'prompt' must be a string or a list of messages, got int"),
    ({"prompt": "q", "system": 3}, r"'system' must be a string, got int"),
    ({"prompt": [USER], "system": "s"}, r"'system' goes with a string 'prompt'"),
    ({"messages": "q"}, r"'messages' must be a list of messages, got str"),
    ({"messages": [{"role": "bot", "content": "q"}]}, r"message 0 has unknown role 'bot'"),
    ({"prompt": [{"role": "user"}]}, r"message 0 needs 'role' and 'content'"),
    ({"prompt": [{"role": "assistant", "content": "q"}]}, r"roles must alternate"),
    ({"prompt": "q", "messages": [USER]}, r"has both 'prompt' and 'messages'"),
    ("[1, 2]", r"expected a JSON object, got list"),
    ('{"prompt": "q"', r"invalid JSON"),
])
def test_a_bad_record_is_the_same_one_line_error_in_every_reader(tok, tmp_path, bad, msg):
    line = bad if isinstance(bad, str) else {**bad, **ANSWERS}
    path = write(tmp_path / "data.jsonl", {"prompt": "q", **ANSWERS}, line)
    got = errors(path, tok)
    assert len(set(got.values())) == 1, got
    (err,) = set(got.values())
    assert err.startswith(f"{path} line 2: ") and "\n" not in err
    assert re.search(msg, err), err


def test_an_answer_is_checked_as_the_assistant_turn_in_every_reader_of_answers(tok, tmp_path):
    tagged = {k: "[INST] a" for k in ("completion", "chosen", "response")}
    path = write(tmp_path / "data.jsonl", {"prompt": "q", **ANSWERS, **tagged})
    got = errors(path, tok, ("sft", "pairs", "responses"))
    assert set(got.values()) == {
        f"{path} line 1: message 1 (assistant) contains the reserved tag '[INST]'"}, got
    assert read_prompts(path) == [[USER]]  # a prompts file does not read the answers


def test_answers_follow_a_prompt_that_ends_with_the_user(tok, tmp_path):
    path = write(tmp_path / "data.jsonl", {**DIALOG, **ANSWERS})
    got = errors(path, tok, ("sft", "pairs", "responses"))
    assert set(got.values()) == {
        f"{path} line 1: the prompt's last message must be from the user"}, got


def test_a_record_without_its_answer_names_the_missing_field(tok, tmp_path):
    path = write(tmp_path / "data.jsonl", {"prompt": "q"})
    got = errors(path, tok, ("sft", "pairs"))
    assert got["sft"] == f"{path} line 1: has no 'completion' ('completion' must be a string)"
    assert got["pairs"] == (f"{path} line 1: has no 'chosen' "
                            "('chosen' must be a non-empty string)")


def test_a_record_without_a_dialog_says_what_the_file_needs(tok, tmp_path):
    path = write(tmp_path / "data.jsonl", {"question": "q"})
    for name, err in errors(path, tok).items():
        assert err.startswith(f"{path} line 1: needs ") and err.endswith("(has question)"), name


def test_every_reader_takes_every_shape(tok, tmp_path):
    path = write(tmp_path / "data.jsonl", *PROMPT_SHAPES)
    dialog = [i for ids, _ in tok.chat_segments(DIALOG["messages"]) for i in ids]
    assert [s.tokens for s in load_samples(path, tok)] == [dialog] * 3
    assert [(p.prompt, p.chosen, p.rejected) for p in load_pairs(path)] == \
        [([SYSTEM, USER], "a", "b")] * 3
    assert read_prompts(path) == [[SYSTEM, USER]] * 3
    assert READERS["responses"](path, tok) == [([SYSTEM, USER], "a")] * 3

    # A whole dialog: lora-train data, a prompt (the answer dropped) and a response.
    path = write(tmp_path / "dialog.jsonl", DIALOG, {"prompt": DIALOG["messages"]})
    assert [s.tokens for s in load_samples(path, tok)] == [dialog] * 2
    assert read_prompts(path) == [[SYSTEM, USER]] * 2
    assert READERS["responses"](path, tok) == [([SYSTEM, USER], "a")] * 2
    # A bare string is a prompt where prompts are expected, and only there.
    path = write(tmp_path / "bare.jsonl", json.dumps("q"))
    assert read_prompts(path) == [[USER]]
    assert "expected a JSON object, got str" in errors(path, tok, ("sft",))["sft"]


@pytest.mark.parametrize("text, answer", [
    ("four [INST] more", "four "), ("a <<SYS>> b [/INST] c", "a "), ("x [/INST]<</SYS>>", "x "),
    ("[/INST]", ""), ("no tag, <</SYS> is no tag", None),
])
def test_chat_and_rejection_sampling_end_an_answer_at_the_same_place(text, answer):
    assert cut_answer(text) == ((answer, True) if answer is not None else (text, False))
    # Chat streams the answer (here one character a chunk) through its stop strings.
    stops = StopStrings(ChatSession(None, None, reuse_cache=False).config.stop)
    streamed = "".join(stops.add(c) for c in text) + stops.flush()
    assert (streamed, stops.hit) == cut_answer(text)


def test_prompts_carry_their_safety_flag(tmp_path):
    from llama2_mlx.chat.records import read_flagged_prompts

    path = write(tmp_path / "p.jsonl", json.dumps("bare"), {"prompt": "q", "safety": True},
                 {"messages": [USER], "safety": False}, {**DIALOG, "safety": True})
    prompts, flags = read_flagged_prompts(path)
    assert flags == [False, True, False, True]
    assert prompts == read_prompts(path) and prompts[3] == [SYSTEM, USER]
    write(path, {"prompt": "q"}, {"prompt": "q", "safety": "yes"})
    with pytest.raises(Llama2Error, match=r"p.jsonl line 2: 'safety' must be true or false, got str"):
        read_flagged_prompts(path)
