import json

import pytest
from conftest import make_model
from typer.testing import CliRunner

import llama2_mlx.generation.chat as chat_mod
import llama2_mlx.generation.generate as gen
from cli.app import app
from llama2_mlx.chat.tokenizer import SPECIAL_TAGS
from llama2_mlx.generation.generate import (
    GenerationConfig,
    Response,
    batch_generate,
    generate,
    prompt_ids,
)

runner = CliRunner()


def chat_answer(tok, messages, **options) -> str:
    """What ``generate`` in the chat format prints: the answer, stopped at a chat tag and
    stripped."""
    config = GenerationConfig(**options, stop=list(SPECIAL_TAGS))
    return generate(make_model(), tok, tok.encode_chat(messages), config).strip()


def user(text):
    return {"role": "user", "content": text}


def test_generate_streams_text_to_stdout_and_stats_to_stderr(plain_dir, tok):
    r = runner.invoke(app, ["generate", "--model", str(plain_dir), "--prompt", "the fox",
                            "--max-tokens", "6"])
    assert r.exit_code == 0, r.stderr
    want = generate(make_model(), tok, prompt_ids(tok, "the fox"), GenerationConfig(max_tokens=6))
    assert r.stdout == want + "\n"  # no chat template in the folder: the text as it is
    for stat in ("prompt: 3 tokens", "tok/s", "generation: 6 tokens", "peak memory", "KV cache"):
        assert stat in r.stderr


def test_a_model_that_carries_a_chat_template_chats_by_default(model_dir, plain_dir, tok):
    args = ["generate", "-p", "the fox", "--max-tokens", "6"]
    default = runner.invoke(app, args + ["-m", str(model_dir)])
    assert default.exit_code == 0, default.stderr
    assert default.stdout == chat_answer(tok, [user("the fox")], max_tokens=6) + "\n"
    n = len(tok.encode_chat([user("the fox")]))
    assert f"prompt: {n} tokens" in default.stderr
    # --chat is still taken (and chats with a folder that has no template)
    assert runner.invoke(app, args + ["-m", str(plain_dir), "--chat"]).stdout == default.stdout
    raw = generate(make_model(), tok, prompt_ids(tok, "the fox"), GenerationConfig(max_tokens=6))
    for flag in ("--raw", "--no-chat", "--ignore-chat-template"):  # the last two: aliases
        r = runner.invoke(app, args + ["-m", str(model_dir), flag])
        assert r.exit_code == 0, r.stderr
        assert r.stdout == raw + "\n" and "prompt: 3 tokens" in r.stderr, flag


def test_generate_chat_format_and_sampling_options(model_dir, tok):
    args = ["generate", "-m", str(model_dir), "-p", "hi", "--system", "be brief", "--temp", "0.8",
            "--top-p", "0.9", "--top-k", "40", "--seed", "5", "--max-tokens", "5",
            "--dtype", "float32", "--max-kv-size", "64"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == 0, a.stderr
    assert a.stdout == b.stdout
    messages = [{"role": "system", "content": "be brief"}, user("hi")]
    assert a.stdout == chat_answer(tok, messages, max_tokens=5, temp=0.8, top_p=0.9, top_k=40,
                                   seed=5, max_kv_size=64) + "\n"
    assert f"prompt: {len(tok.encode_chat(messages))} tokens" in a.stderr
    # mlx-lm's name of the option
    alias = runner.invoke(app, [a if a != "--system" else "--system-prompt" for a in args])
    assert alias.exit_code == 0 and alias.stdout == a.stdout
    r = runner.invoke(app, args + ["--raw"])
    assert r.exit_code == 2 and r.stderr == "error: --system needs the chat format, not --raw\n"


def test_the_prompt_from_stdin(model_dir, tok):
    text = "the quick brown fox\njumps over the lazy dog"
    r = runner.invoke(app, ["generate", "-m", str(model_dir), "-p", "-", "--max-tokens", "4"],
                      input=text + "\n")
    want = runner.invoke(app, ["generate", "-m", str(model_dir), "-p", text, "--max-tokens", "4"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == want.stdout
    n = len(tok.encode_chat([user(text)]))  # all of stdin, its last newline aside
    assert f"prompt: {n} tokens" in r.stderr and f"prompt: {n} tokens" in want.stderr
    r = runner.invoke(app, ["generate", "-m", str(model_dir), "-p", "-", "--raw",
                            "--max-tokens", "4"], input=text + "\n")
    assert f"prompt: {len(tok.encode(text, bos=True))} tokens" in r.stderr


def test_several_prompts_run_as_one_batch(model_dir, tok, tmp_path):
    prompts = ["the fox", "hello world one two"]
    r = runner.invoke(app, ["generate", "-m", str(model_dir), "-p", prompts[0], "-p", prompts[1],
                            "--max-tokens", "5"])
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    config = GenerationConfig(max_tokens=5)
    outs = batch_generate(make_model(), tok, [tok.encode_chat([user(p)]) for p in prompts], config)
    want = [tok.decode(o) for o in outs]
    want = [chat_answer_cut(t) for t in want]
    assert lines == [{"prompt": p, "response": w} for p, w in zip(prompts, want)]
    assert "2 prompts in one batch" in r.stderr
    # --prompts-file: any prompt record; the output can be scored (reward-score reads it)
    f = tmp_path / "prompts.jsonl"
    dialog = [user("the fox"), {"role": "assistant", "content": "ran"}, user("why?")]
    f.write_text(json.dumps({"prompt": prompts[1]}) + "\n" + json.dumps({"messages": dialog}) + "\n")
    r = runner.invoke(app, ["generate", "-m", str(model_dir), "-p", prompts[0],
                            "--prompts-file", str(f), "--max-tokens", "5"])
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == [prompts[0], prompts[1], dialog]
    assert lines[0]["response"] == want[0]
    # a dialog cannot be sent as raw text
    r = runner.invoke(app, ["generate", "-m", str(model_dir), "--prompts-file", str(f), "--raw"])
    assert r.exit_code == 2 and r.stderr == (
        "error: prompt 2 is a dialog of 3 messages: it needs the chat format, not --raw\n")


def chat_answer_cut(text: str) -> str:
    from llama2_mlx.chat.records import cut_answer

    return cut_answer(text)[0].strip()


def test_no_prompt_is_a_one_line_error(model_dir):
    r = runner.invoke(app, ["generate", "-m", str(model_dir)])
    assert r.exit_code == 2 and r.stderr == "error: give --prompt (repeat it for a batch) or --prompts-file\n"


@pytest.mark.parametrize("args, message", [
    (["--temp", "1", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--max-tokens=0"], "--max-tokens must be >= 1, got 0"),
    (["--max-kv-size", "4"], "--max-kv-size 4 must be larger than 4 kept tokens"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0, got 0.0"),
])
def test_bad_options_are_one_line_errors_that_name_the_option_as_typed(model_dir, args, message):
    r = runner.invoke(app, ["generate", "-m", str(model_dir), "-p", "x", *args])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [f"error: {message}"]


def test_missing_model_falls_back_to_the_demo_model_with_a_note(model_dir, monkeypatch):
    import llama2_mlx.demo as demo

    monkeypatch.setattr(demo, "default_model_path", lambda: model_dir)
    for cmd, extra in (("generate", ["-p", "x"]), ("chat", [])):
        r = runner.invoke(app, [cmd, *extra, "--max-tokens", "2"], input="hi\n/quit\n")
        assert r.exit_code == 0, r.stderr
        assert demo.DEMO_NOTE in r.stderr and "--model" in demo.DEMO_NOTE


def test_missing_demo_assets_is_a_one_line_error(monkeypatch, tmp_path):
    import llama2_mlx.demo as demo

    monkeypatch.setattr(demo, "ASSETS", tmp_path)
    r = runner.invoke(app, ["generate", "-p", "x"])
    assert r.exit_code == 2 and "pass --model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_chat_keeps_history_and_handles_reset_and_quit(model_dir, tok, monkeypatch):
    seen, answers = [], []
    real = chat_mod.stream_generate

    def recording(model, tokenizer, ids, config, prompt_cache=None):
        seen.append(list(ids))
        answers.append("")
        for resp in real(model, tokenizer, ids, config, prompt_cache):
            answers[-1] += resp.text
            yield resp

    monkeypatch.setattr(chat_mod, "stream_generate", recording)
    r = runner.invoke(app, ["chat", "-m", str(model_dir), "--max-tokens", "4"],
                      input="hello\nthe fox\n/reset\nagain\n/quit\nnever read\n")
    assert r.exit_code == 0, r.stderr
    shown = [a.strip() for a in answers]  # answers are stripped, as the chat format has them
    assert len(seen) == 3 and r.stdout == "".join(f"{text}\n" for text in shown)
    u = lambda text: {"role": "user", "content": text}  # noqa: E731
    a = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    assert seen[0] == tok.encode_chat([u("hello")])
    assert seen[1] == tok.encode_chat([u("hello"), a(shown[0]), u("the fox")])
    assert seen[2] == tok.encode_chat([u("again")])  # after /reset
    assert "history cleared" in r.stderr


def fake_stream(texts):
    """A stream_generate that answers with ``texts``, whatever the prompt."""
    def stream(model, tokenizer, ids, config=None, prompt_cache=None):
        for i, t in enumerate(texts):
            yield Response(t, 0, "stop" if i == len(texts) - 1 else None, len(ids), 1.0, i + 1,
                           1.0, 0.0, 0)
    return stream


def test_chat_help_eof_and_no_trailing_space(model_dir, monkeypatch):
    monkeypatch.setattr(chat_mod, "stream_generate", fake_stream([" Paris", " ", " ", ""]))
    r = runner.invoke(app, ["chat", "-m", str(model_dir)], input="/help\nthe capital?\n/nope\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Paris\n"  # /help and /nope never reach the model; no trailing space
    for command in ("/help", "/reset", "/quit"):
        assert command in r.stderr
    assert "unknown command /nope" in r.stderr
    assert r.stderr.endswith(">>> \n")  # the line that Ctrl-D (end of input) left open
    # generate in the chat format prints the answer stripped too
    monkeypatch.setattr(gen, "stream_generate", fake_stream(["Paris", " ", ""]))
    r = runner.invoke(app, ["generate", "-m", str(model_dir), "-p", "the capital?"])
    assert r.exit_code == 0 and r.stdout == "Paris\n"


def test_chat_ends_at_end_of_input(model_dir):
    r = runner.invoke(app, ["chat", "-m", str(model_dir), "--max-tokens", "2"], input="hi\n")
    assert r.exit_code == 0 and r.stdout.count("\n") == 1


def test_every_help_text_shows_as_written():
    """Rich markup must not eat help texts (``[default: N]`` would vanish)."""
    import typer

    for name, cmd in typer.main.get_command(app).commands.items():
        r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "1000"})
        assert r.exit_code == 0, r.output
        shown = " ".join(r.output.split())
        for text in [cmd.help] + [p.help for p in cmd.params if p.help]:
            assert " ".join(text.split()) in shown, (name, text)
