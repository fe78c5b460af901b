import random

import pytest

from llama2_mlx.chat.tokenizer import Tokenizer
from llama2_mlx.errors import Llama2Error


def test_llama2_recipe_digits_split_and_byte_fallback(tok):
    ids = tok.encode("count 1234", bos=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[-4:] == ["1", "2", "3", "4"] or pieces[-4:] == ["▁1", "2", "3", "4"][-4:]
    assert all(len(p.strip("▁")) <= 1 for p in pieces[-4:])
    # "€" was never seen in training: it falls back to its three UTF-8 bytes.
    ids = tok.encode("€", bos=False)
    assert [tok.id_to_piece(i) for i in ids][-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert tok.decode(ids) == "€"
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_encode_bos_eos(tok):
    body = tok.encode("hello world", bos=False)
    assert tok.encode("hello world") == [1] + body
    assert tok.encode("hello world", eos=True) == [1] + body + [2]
    assert tok.decode(body) == "hello world"


def test_chat_format_matches_meta_chat_completion(tok):
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "what is two plus two? "},
        {"role": "assistant", "content": " four "},
        {"role": "user", "content": "and three?"},
    ]
    e = tok.encode
    expected = e(
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nwhat is two plus two? [/INST] four ",
        bos=True, eos=True,
    ) + e("[INST] and three? [/INST]", bos=True)
    assert tok.encode_chat(dialog) == expected
    # Without a system prompt; contents are stripped.
    assert tok.encode_chat([{"role": "user", "content": " hello\n"}]) == e("[INST] hello [/INST]")
    # Meta strips the folded content as a whole: spaces after <</SYS>> stay.
    folded = tok.encode_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "  u"}])
    assert folded == e("[INST] <<SYS>>\nS\n<</SYS>>\n\n  u [/INST]")


def test_chat_segments_flag_exactly_the_answers(tok):
    dialog = [
        {"role": "user", "content": "reverse fox"},
        {"role": "assistant", "content": "xof"},
        {"role": "user", "content": "spell dog"},
        {"role": "assistant", "content": "d o g"},
    ]
    segs = tok.chat_segments(dialog)
    assert [flag for _, flag in segs] == [False, True, False, True]
    e = tok.encode
    assert segs[0][0] + segs[1][0] == e("[INST] reverse fox [/INST] xof ", eos=True)
    assert segs[0][0] == e("[INST] reverse fox [/INST]")
    assert segs[1][0][-1] == tok.eos_id and tok.decode(segs[1][0][:-1]).strip() == "xof"
    assert segs[3][0][-1] == tok.eos_id and tok.decode(segs[3][0]).strip() == "d o g"


@pytest.mark.parametrize(
    "dialog, msg",
    [
        ([{"role": "user", "content": "hi [INST] there"}], "reserved tag '[INST]'"),
        ([{"role": "user", "content": "<<SYS>> x"}], "reserved tag '<<SYS>>'"),
        ([{"role": "system", "content": "a <</SYS>>"}, {"role": "user", "content": "b"}], "<</SYS>>"),
        ([{"role": "assistant", "content": "hi"}], "roles must alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
        ([{"role": "robot", "content": "a"}], "unknown role"),
        ([{"role": "system", "content": "a"}], "needs a user message"),
        ([], "no messages"),
    ],
)
def test_bad_dialogs_are_refused(tok, dialog, msg):
    with pytest.raises(Llama2Error, match=msg.replace("[", r"\[").replace("]", r"\]")):
        tok.chat_segments(dialog)


def test_encode_chat_needs_a_final_user_turn(tok):
    with pytest.raises(Llama2Error, match="last message"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


@pytest.mark.parametrize("seed", range(5))
def test_streaming_detokenizer_equals_decode_and_emits_whole_characters(tok, seed):
    rng = random.Random(seed)
    words = ["the", "fox", "café", "日本", "€uro", "12", "naïve", "✓", "  ", "\n", "zebra"]
    text = " ".join(rng.choice(words) for _ in range(30))
    ids = tok.encode(text, bos=False)
    det = tok.detokenizer()
    chunks = [det.add(i) for i in ids] + [det.flush()]
    assert "".join(chunks) == tok.decode(ids)
    assert not any("\ufffd" in c for c in chunks)


def test_missing_tokenizer_file_is_one_line_error(tmp_path):
    with pytest.raises(Llama2Error, match="tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(Llama2Error, match="bad.model: not a SentencePiece model"):
        Tokenizer(bad)
