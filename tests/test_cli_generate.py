from conftest import make_model
from typer.testing import CliRunner

import llama2_mlx.generation.generate as gen
from cli.app import app
from llama2_mlx.generation.generate import GenerationConfig, generate, prompt_ids

runner = CliRunner()


def test_generate_streams_text_to_stdout_and_stats_to_stderr(model_dir, tok):
    r = runner.invoke(app, ["generate", "--model", str(model_dir), "--prompt", "the fox",
                            "--max-tokens", "6"])
    assert r.exit_code == 0, r.stderr
    want = generate(make_model(), tok, prompt_ids(tok, "the fox"), GenerationConfig(max_tokens=6))
    assert r.stdout == want + "\n"
    for stat in ("prompt: 3 tokens", "tok/s", "generation: 6 tokens", "peak memory", "KV cache"):
        assert stat in r.stderr


def test_generate_chat_format_and_sampling_options(model_dir, tok):
    args = ["generate", "-m", str(model_dir), "-p", "hi", "--system", "be brief", "--temp", "0.8",
            "--top-p", "0.9", "--top-k", "40", "--seed", "5", "--max-tokens", "5",
            "--dtype", "float32", "--max-kv-size", "64"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == 0, a.stderr
    assert a.stdout == b.stdout
    config = GenerationConfig(max_tokens=5, temp=0.8, top_p=0.9, top_k=40, seed=5, max_kv_size=64)
    ids = prompt_ids(tok, "hi", system="be brief")
    assert a.stdout == generate(make_model(), tok, ids, config) + "\n"
    assert f"prompt: {len(ids)} tokens" in a.stderr


def test_generate_bad_option_is_a_one_line_error(model_dir):
    r = runner.invoke(app, ["generate", "-m", str(model_dir), "-p", "x", "--temp", "1",
                            "--top-p", "1.5"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        "error: top_p must be in (0, 1], got 1.5"]


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
    real = gen.stream_generate

    def recording(model, tokenizer, ids, config, prompt_cache=None):
        seen.append(list(ids))
        answers.append("")
        for resp in real(model, tokenizer, ids, config, prompt_cache):
            answers[-1] += resp.text
            yield resp

    monkeypatch.setattr(gen, "stream_generate", recording)
    r = runner.invoke(app, ["chat", "-m", str(model_dir), "--max-tokens", "4"],
                      input="hello\nthe fox\n/reset\nagain\n/quit\nnever read\n")
    assert r.exit_code == 0, r.stderr
    assert len(seen) == 3 and r.stdout == "".join(f"{text}\n" for text in answers)
    u = lambda text: {"role": "user", "content": text}  # noqa: E731
    a = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    assert seen[0] == tok.encode_chat([u("hello")])
    assert seen[1] == tok.encode_chat([u("hello"), a(answers[0]), u("the fox")])
    assert seen[2] == tok.encode_chat([u("again")])  # after /reset
    assert "history cleared" in r.stderr


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
