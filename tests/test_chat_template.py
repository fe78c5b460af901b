"""Every model folder we write chats like ``llama2 generate --chat``: its chat template,
rendered and tokenized by transformers and by mlx-lm, gives exactly ``encode_chat``'s ids
(= Meta's ``chat_completion``); a GGUF file carries the same template."""

from __future__ import annotations

import pytest

from conftest import make_model
from llama2_mlx.chat.tokenizer import CHAT_TEMPLATE, Tokenizer
from llama2_mlx.checkpoints.export import save_model
from llama2_mlx.demo import default_model_path

DIALOGS = [
    [{"role": "user", "content": "What number comes after 41?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": " hello "}, {"role": "assistant", "content": " 42 "},
     {"role": "user", "content": "and then? 1234567"}],
    [{"role": "system", "content": "Réponds en français."},
     {"role": "user", "content": "Quelle est la capitale? 東京"},
     {"role": "assistant", "content": "Paris 😀"}, {"role": "user", "content": "Merci\nencore"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
     {"role": "user", "content": "3 + 4 = ?"}],
]


@pytest.fixture(scope="module", params=["demo", "tiny"])
def folder(request, tmp_path_factory, spm_path):
    """The bundled demo model as shipped, and a folder ``save_model`` writes."""
    if request.param == "demo":
        return default_model_path()
    return save_model(make_model(vocab_size=512), tmp_path_factory.mktemp("m") / "out", spm_path)


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("fast", [False, True], ids=["slow", "fast"])
def test_transformers_chat_template_gives_our_ids(folder, fast):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=fast)
    ours = Tokenizer(folder / "tokenizer.model")
    for d in DIALOGS:
        assert _ids(theirs.apply_chat_template(d, tokenize=True)) == ours.encode_chat(d), d


def test_mlx_lm_chat_template_gives_our_ids(folder):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    theirs = load_tokenizer(folder)
    ours = Tokenizer(folder / "tokenizer.model")
    for d in DIALOGS:
        assert _ids(theirs.apply_chat_template(d, tokenize=True)) == ours.encode_chat(d), d


def test_gguf_carries_the_template(tmp_path, spm_path):
    import gguf

    from llama2_mlx.formats.gguf import write_gguf

    path = write_gguf(make_model(vocab_size=512), tmp_path / "m.gguf", spm_path, "f32")
    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == CHAT_TEMPLATE


def test_llama2_generate_chats_like_mlx_lm_with_the_folder_s_template(folder):
    """``llama2 generate`` on a folder that carries the template applies the chat format
    by default, as mlx-lm does: the same prompt tokens and the same greedy answer."""
    import re

    import mlx_lm
    from typer.testing import CliRunner

    from cli.app import app

    question = "What is the capital of France?"
    r = CliRunner().invoke(app, ["generate", "-m", str(folder), "-p", question,
                                 "--max-tokens", "8", "--dtype", "float32"])
    assert r.exit_code == 0, r.stderr
    model, tokenizer = mlx_lm.load(str(folder), model_config={"dtype": "float32"})
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
    assert int(re.search(r"prompt: (\d+) tokens", r.stderr)[1]) == len(_ids(ids))
    tokens = [x.token for x in mlx_lm.stream_generate(model, tokenizer, _ids(ids), max_tokens=8)]
    tokens = [t for t in tokens if t != tokenizer.eos_token_id]
    # (decoded by one detokenizer: a random model's stray bytes are shown differently)
    theirs = Tokenizer(folder / "tokenizer.model").decode(tokens)
    assert r.stdout == theirs.strip() + "\n"
    if folder == default_model_path():
        assert r.stdout == "Paris\n"
