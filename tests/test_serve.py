"""``llama2 serve`` live: the server runs in a subprocess on a free 127.0.0.1 port
(``--port 0``; it prints its URL on stderr) and is driven by the official ``openai``
client and by ``httpx`` for what a client library would not send.

Two servers: the bundled demo model with a LoRA adapter ("tuned") and a tiny reward
model, and a tiny random model (long answers: it rarely says EOS) behind an API key
given in ``LLAMA2_API_KEY``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlx.core as mx
import openai
import pytest
from typer.testing import CliRunner

from test_serve_engine import Poisoned

from cli.app import app
from llama2_mlx import demo

ROOT = Path(__file__).resolve().parents[1]
DEMO = "llama2-demo"
KEY = "sekret-key"
runner = CliRunner()


def start_server(args, env=None, timeout=120):
    """``llama2 serve --port 0 ARGS`` in a subprocess; (process, URL, stderr lines)."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "cli.app", "serve", "--port", "0", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines, found = [], queue.Queue()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "listening on " in line:
                found.put(line.split("listening on ")[1].split()[0])
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = found.get(timeout=timeout)
    except queue.Empty:
        url = None
    if url is None:
        stop_server(proc)
        pytest.fail("the server did not start:\n" + "".join(lines))
    return proc, url, lines


def stop_server(proc, timeout=30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A LoRA adapter and a reward model (LoRA, random head) for the demo model."""
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.models.lora import LoRAConfig, apply_lora, lora_layers, save_adapters
    from llama2_mlx.rlhf.reward_model import RewardModel, save_reward_model

    root, base = tmp_path_factory.mktemp("serve"), demo.default_model_path()
    mx.random.seed(0)
    model, _ = load(base)
    config = LoRAConfig(rank=4, scale=2.0)
    apply_lora(model, config)
    for _, layer in lora_layers(model):
        layer.lora_b = 0.2 * mx.random.normal(layer.lora_b.shape)
    adapter = save_adapters(model, root / "adapter", config)
    rm = RewardModel.from_policy(load(base)[0])
    apply_lora(rm, config)
    rm_dir = save_reward_model(rm, root / "rm", base_model=base, lora_config=config)
    return adapter, rm_dir


@pytest.fixture(scope="module")
def demo_server(artifacts):
    adapter, rm_dir = artifacts
    proc, url, lines = start_server(["--adapters", f"tuned={adapter}", "--reward-model", str(rm_dir)])
    yield url
    assert stop_server(proc) == 0
    assert "Traceback" not in "".join(lines)


@pytest.fixture(scope="module")
def random_server(model_dir):
    proc, url, lines = start_server(["--model", str(model_dir), "--max-concurrency", "8"],
                                    env={"LLAMA2_API_KEY": KEY})
    yield url, proc
    stop_server(proc)
    assert "Traceback" not in "".join(lines)


def health(url):
    return httpx.get(url + "/health", timeout=10).json()


def cli_answer(question, max_tokens, *extra):
    r = runner.invoke(app, ["generate", "--chat", "-p", question, "--max-tokens", str(max_tokens),
                            *extra])
    assert r.exit_code == 0, r.stderr
    return r.stdout[:-1]  # the trailing newline


# ----------------------------------------------------------------------------- the demo server


def test_models_and_health(demo_server):
    assert [m.id for m in client(demo_server).models.list().data] == [DEMO, "tuned"]
    h = health(demo_server)
    assert h["status"] == "ok" and h["models"] == [DEMO, "tuned"]


@pytest.mark.parametrize("question", [demo.EXAMPLES[0][0], demo.EXAMPLES[4][0]])
def test_chat_greedy_equals_generate_chat_streamed_or_not(demo_server, question):
    c = client(demo_server)
    want = cli_answer(question, 24)
    r = c.chat.completions.create(model=DEMO, messages=user(question), temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.created > 0
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == want
    assert choice.finish_reason == "stop"
    from llama2_mlx.chat.tokenizer import Tokenizer

    ids = Tokenizer(demo.default_model_path() / "tokenizer.model").encode_chat(user(question))
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=DEMO, messages=user(question), temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completions_text_logprobs_length_and_stream(demo_server):
    c = client(demo_server)
    prompt = f"[INST] {demo.EXAMPLES[1][0]} [/INST]"  # Meta's format by hand: text after BOS
    r = c.completions.create(model=DEMO, prompt=prompt, temperature=0, max_tokens=10, logprobs=2)
    (choice,) = r.choices
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    # Raw text as generated; `generate --chat` shows the answer stripped.
    assert choice.text.strip() == cli_answer(demo.EXAMPLES[1][0], 10)
    assert choice.finish_reason == "stop"
    lp = choice.logprobs
    assert "".join(lp.tokens).strip() == choice.text.strip()
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset)
    assert all(len(t) == 2 and max(t.values()) == l for t, l in zip(lp.top_logprobs, lp.token_logprobs))
    short = c.completions.create(model=DEMO, prompt=prompt, temperature=0, max_tokens=1)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1
    stream = list(c.completions.create(model=DEMO, prompt=prompt, temperature=0, max_tokens=10,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in stream) == choice.text
    assert stream[-1].choices[0].finish_reason == "stop"
    # Chat logprobs: the chosen token and its alternatives, as the chat API gives them.
    r = c.chat.completions.create(model=DEMO, messages=user(demo.EXAMPLES[1][0]), temperature=0,
                                  max_tokens=10, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content).strip() == r.choices[0].message.content.strip()
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)


def test_n_samples_share_one_prefill_and_decode_together(demo_server):
    c = client(demo_server)
    question = "Which city is the capital of Peru? Be brief."
    before = health(demo_server)
    r = c.chat.completions.create(model=DEMO, messages=user(question), temperature=0, n=3,
                                  max_tokens=12)
    after = health(demo_server)
    texts = [ch.message.content for ch in r.choices]
    assert [ch.index for ch in r.choices] == [0, 1, 2] and len(set(texts)) == 1
    assert texts[0] == cli_answer(question, 12)
    # The prompt went through the model once (prefilled or taken from the prompt cache).
    ran = (after["prefilled_tokens"] - before["prefilled_tokens"]
           + after["cached_tokens"] - before["cached_tokens"])
    assert ran == r.usage.prompt_tokens - 1
    assert r.usage.completion_tokens == 3 * (r.usage.completion_tokens // 3)
    a, b = (c.chat.completions.create(model=DEMO, messages=user("Spell the word lemon."),
                                      temperature=1.0, n=4, seed=5, max_tokens=12)
            for _ in range(2))
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]


def test_best_of_picks_by_the_reward_model(demo_server):
    c = client(demo_server)
    kw = dict(model=DEMO, prompt="[INST] Spell the word river. [/INST]", temperature=1.5,
              seed=3, best_of=4, max_tokens=12)
    every = c.completions.create(n=4, **kw).model_dump()
    rewards = [ch["reward"] for ch in every["choices"]]
    assert len(rewards) == 4 and rewards == sorted(rewards, reverse=True)
    best = c.completions.create(n=1, **kw).model_dump()  # the same 4 samples, the best one
    assert best["choices"][0]["text"] == every["choices"][0]["text"]
    assert best["choices"][0]["reward"] == pytest.approx(rewards[0])
    assert best["usage"]["completion_tokens"] == every["usage"]["completion_tokens"]


def test_stop_strings(demo_server):
    c = client(demo_server)
    for stop in (" d", [" x", " d"]):
        r = c.chat.completions.create(model=DEMO, messages=user("Spell the word garden."),
                                      temperature=0, stop=stop, max_tokens=20)
        assert r.choices[0].message.content == "g a r" and r.choices[0].finish_reason == "stop"


def test_seed_reproducibility_under_concurrent_traffic(demo_server):
    c = client(demo_server)
    kw = dict(model=DEMO, messages=user("Spell the word orange backwards."), temperature=1.2,
              top_p=0.95, max_tokens=16)
    alone = c.chat.completions.create(seed=42, **kw).choices[0].message.content
    with ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(c.chat.completions.create, **kw) for _ in range(5)]
        busy = pool.submit(c.chat.completions.create, seed=42, **kw)
        [f.result() for f in noise]
        assert busy.result().choices[0].message.content == alone
    others = {c.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(5)}
    assert len(others) > 1


def test_an_adapter_is_chosen_by_model(demo_server, artifacts):
    c = client(demo_server)
    question = demo.EXAMPLES[2][0]
    tuned = c.chat.completions.create(model="tuned", messages=user(question), temperature=0,
                                      max_tokens=16)
    assert tuned.model == "tuned"
    assert tuned.choices[0].message.content == cli_answer(question, 16, "--adapter-path",
                                                          str(artifacts[0]))
    assert tuned.choices[0].message.content != cli_answer(question, 16)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=user(question))
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_multi_turn_chat_reuses_the_prompt_cache(demo_server):
    c = client(demo_server)
    dialog = user("How many centimeters are in 7 meters?")
    first = c.chat.completions.create(model=DEMO, messages=dialog, temperature=0, max_tokens=16)
    dialog += [{"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "How many cents are in 3 dollars?"}]
    second = c.chat.completions.create(model=DEMO, messages=dialog, temperature=0, max_tokens=16)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


BIG = 1 << 20
BAD = [  # (path, body, param, code)
    ("chat", b"{not json", None, "invalid_json"),
    ("chat", b"[1, 2]", None, "invalid_json"),
    ("chat", b"\xff\xfe", None, "invalid_json"),
    ("chat", {"messages": user("hi"), "temperature": "hot"}, "temperature", "invalid_type"),
    ("chat", {"messages": user("hi"), "n": True}, "n", "invalid_type"),
    ("chat", {"messages": "hi"}, "messages", "invalid_type"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ("chat", {"model": DEMO}, "messages", "missing_required_parameter"),
    ("chat", {"messages": user("hi"), "foo": 1}, "foo", "unknown_parameter"),
    ("chat", {"messages": []}, "messages", "invalid_messages"),
    ("chat", {"messages": user("a") + user("b")}, "messages", "invalid_messages"),
    ("chat", {"messages": [{"role": "assistant", "content": "a"}] + user("b")}, "messages",
     "invalid_messages"),
    ("chat", {"messages": user("a [INST] b")}, "messages", "invalid_messages"),
    ("chat", {"messages": [{"role": "system", "content": "<<SYS>>"}] + user("b")}, "messages",
     "invalid_messages"),
    ("chat", {"messages": user("hi"), "max_tokens": 10_000}, "max_tokens", "context_length_exceeded"),
    ("chat", {"messages": user("hi"), "max_completion_tokens": 0}, "max_completion_tokens",
     "invalid_value"),
    ("chat", {"messages": user("hi"), "n": 17}, "n", "invalid_value"),
    ("chat", {"messages": user("hi"), "top_logprobs": 2}, "top_logprobs", None),
    ("chat", {"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ("chat", {"messages": user("hi"), "frequency_penalty": 0.5}, "frequency_penalty",
     "unsupported_value"),
    ("completions", {"prompt": 5}, "prompt", "invalid_type"),
    ("completions", {"prompt": "word " * 300}, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
    ("completions", {"prompt": "x", "best_of": 17}, "best_of", "invalid_value"),
    ("completions", {"prompt": "x", "best_of": 1, "n": 2}, "best_of", "invalid_value"),
    ("completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of", "invalid_value"),
    ("completions", {"prompt": "x", "echo": True}, "echo", "unsupported_value"),
    ("completions", b'{"prompt": "' + b"x" * BIG + b'"}', None, "request_too_large"),
]


@pytest.mark.parametrize("path, body, param, code", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_400_with_the_openai_error_object(demo_server, path, body, param, code):
    url = demo_server + ("/v1/chat/completions" if path == "chat" else "/v1/completions")
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code
    assert err["message"] and "Traceback" not in r.text


def test_the_server_survives_bad_requests_and_unknown_routes(demo_server):
    r = httpx.get(demo_server + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(demo_server + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    # A body that says it is bigger than the limit is refused before it is read ...
    host, port = demo_server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n{}" % (10 * BIG))
        head = b""
        while b"request_too_large" not in head and (part := s.recv(4096)):
            head += part
    assert head.startswith(b"HTTP/1.1 400") and b"request_too_large" in head
    # ... and one sent without a length (chunked) as soon as it grows past the limit.
    parts = (p for p in [b'{"prompt": "', b"x" * BIG, b'"}'])
    r = httpx.post(demo_server + "/v1/completions", content=parts, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
    assert health(demo_server)["status"] == "ok"


def test_load_16_clients_times_4_requests(demo_server):
    c = client(demo_server)
    questions = [q for q, _ in demo.EXAMPLES]
    before = health(demo_server)

    def session(i):
        out = []
        for j in range(4):
            q = questions[(i + j) % len(questions)]
            if j % 2:
                chunks = c.chat.completions.create(model=DEMO, messages=user(q), temperature=0,
                                                   max_tokens=8, stream=True)
                out.append("".join(ch.choices[0].delta.content or "" for ch in chunks))
            else:
                r = c.completions.create(model=DEMO, prompt=f"[INST] {q} [/INST]", temperature=0,
                                         max_tokens=8)
                out.append(r.choices[0].text)
        return out

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(session, range(16)))
    assert len(results) == 16 and all(len(r) == 4 for r in results)
    # Greedy answers are the same whatever else was in the batch (chat answers come
    # stripped, raw completions as generated: compared stripped).
    seen = {}
    for i, r in enumerate(results):
        for j, text in enumerate(r):
            seen.setdefault(questions[(i + j) % len(questions)], set()).add(text.strip())
    assert all(len(v) == 1 for v in seen.values())
    after = health(demo_server)
    assert after["status"] == "ok" and after["completed"] - before["completed"] == 64
    assert after["max_batch"] > 1 and after["decoding_sequences"] == 0


# ----------------------------------------------------------------------------- the random model


def test_api_key_from_the_environment_is_required(random_server):
    url, _ = random_server
    for key in (None, "wrong"):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(url + "/v1/models", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").completions.create(model="x", prompt="hi")
    assert len(client(url, KEY).models.list().data) == 1
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # open


def test_concurrent_greedy_requests_equal_their_answers_alone(random_server, model_dir):
    """Different prompt lengths arriving at different times share decode steps; every
    answer is the one ``generate`` gives alone."""
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.generation.generate import GenerationConfig, generate

    model, tok = load(model_dir)
    prompts = ["the fox", "one two three four five six seven eight nine ten plus minus",
               "hello", "what is the capital of france paris italy rome the quick brown"]
    want = [generate(model, tok, tok.encode(p), GenerationConfig(max_tokens=24)) for p in prompts]
    url, _ = random_server
    c = client(url, KEY)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: c.completions.create(
            model=str(model_dir), prompt=prompts[i % 4], temperature=0, max_tokens=24).choices[0].text,
            range(8)))
    assert got == want * 2


def test_a_client_that_disconnects_mid_stream_stops_its_generation(random_server):
    url, _ = random_server
    before = health(url)
    body = {"prompt": "the quick brown fox", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    for _ in range(200):
        h = health(url)
        if h["cancelled"] > before["cancelled"] and h["decoding_sequences"] == 0:
            break
        threading.Event().wait(0.05)
    assert h["cancelled"] == before["cancelled"] + 1 and h["decoding_sequences"] == 0
    assert h["generated_tokens"] - before["generated_tokens"] < 200
    assert h["active_requests"] == 0 and h["status"] == "ok"


def test_sigterm_finishes_or_cancels_in_flight_requests_and_exits_cleanly(model_dir):
    proc, url, lines = start_server(["--model", str(model_dir)])
    try:
        got = []
        body = {"prompt": "hello", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                got.append(line)
                if len(got) == 1:
                    proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert got and all(g.startswith("data:") or not g for g in got)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        stop_server(proc)
    assert "Traceback" not in "".join(lines)


def test_adapter_path_adapts_the_default_model_on_the_shared_base(artifacts):
    from mlx.utils import tree_flatten

    from llama2_mlx.models.lora import lora_layers
    from llama2_mlx.serve.server import ServeConfig, load_served

    adapter, rm_dir = artifacts
    served = load_served(ServeConfig(adapter_path=str(adapter), adapters={"again": str(adapter)},
                                     reward_model=str(rm_dir)))
    assert served.names == [DEMO, "again"]
    (default, _), (again, _) = served.models[DEMO], served.models["again"]
    assert lora_layers(default) and lora_layers(again) and default is not again
    base = {id(v) for k, v in tree_flatten(default.parameters()) if "lora" not in k}
    # The reward model, trained (with LoRA) on the demo model, runs on the same arrays.
    assert base & {id(v) for _, v in tree_flatten(served.reward_model.parameters())}


def test_a_request_the_engine_fails_on_gets_500_and_the_server_lives_on():
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.serve.protocol import Limits
    from llama2_mlx.serve.server import ServeConfig, Served, Server

    model, tok = load(demo.default_model_path())
    bad = tok.encode("Paris", bos=False)[-1]
    served = Served({DEMO: (Poisoned(model, bad), tok)}, tok, None, Limits(context=256))
    server = Server(ServeConfig(port=0), served=served).start_in_thread()
    try:
        url = server.url + "/v1/completions"
        for prompt in ("Paris is a city", "the capital is Paris"):  # in the prefill, the decode
            r = httpx.post(url, json={"prompt": prompt, "max_tokens": 4}, timeout=30)
            assert r.status_code == 500, r.text
            assert r.json()["error"]["type"] == "server_error" and "Traceback" not in r.text
        with httpx.stream("POST", url, timeout=30, json={"prompt": "Paris", "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert json.loads(lines[0][6:])["error"]["type"] == "server_error"
        assert lines[-1] == "data: [DONE]"
        r = httpx.post(url, json={"prompt": "[INST] Spell the word garden. [/INST]",
                                  "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "g a r d e n "
        assert health(server.url)["failed"] == 3
    finally:
        server.stop()
    assert not server.engine.alive


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("args, message", [
    (["--adapters", "nopath"], "error: --adapters 'nopath': expected NAME=PATH"),
    (["--adapters", "a=x", "--adapters", "a=y"], "error: --adapters: the name 'a' is given twice"),
    (["--port", "70000"], "error: --port must be in 0..65535, got 70000"),
    (["--max-concurrency", "0"], "error: --max-concurrency must be >= 1, got 0"),
])
def test_serve_cli_refuses_bad_options_in_one_line(args, message):
    r = runner.invoke(app, ["serve", *args])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [message]


def test_serve_cli_port_in_use_is_one_line(demo_server):
    port = demo_server.rsplit(":", 1)[1]
    r = runner.invoke(app, ["serve", "--port", port])
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("spec", [["--prompt-lookup", "3"], ["--draft-model", "MODEL_DIR"]])
def test_speculative_decoding_answers_exactly_as_plain_decoding(random_server, model_dir, spec):
    """``--prompt-lookup`` / ``--draft-model``: a lone request decodes speculatively, with
    the plain server's greedy answers (streamed or not, chat and completions); requests
    that overlap it decode in the batch, with their answers too."""
    spec = [str(model_dir) if a == "MODEL_DIR" else a for a in spec]
    proc, url, lines = start_server(["--model", str(model_dir), *spec])
    try:
        prompts = ["the fox the fox the fox the fox", "one two three one two three one two",
                   "hello"]
        plain, fast = client(random_server[0], KEY), client(url)
        for p in prompts:
            args = dict(model=str(model_dir), prompt=p, temperature=0, max_tokens=32)
            want = plain.completions.create(**args).choices[0].text
            assert fast.completions.create(**args).choices[0].text == want
            streamed = fast.completions.create(**args, stream=True)
            assert "".join(c.choices[0].text for c in streamed) == want
            chat = dict(model=str(model_dir), messages=user(p), temperature=0, max_tokens=16)
            want = plain.chat.completions.create(**chat).choices[0].message.content
            assert fast.chat.completions.create(**chat).choices[0].message.content == want
        stats = health(url)
        assert stats["drafted_tokens"] > 0 and stats["accepted_tokens"] > 0, stats
        with ThreadPoolExecutor(4) as pool:  # overlapping: one solo, the others batched
            got = list(pool.map(lambda i: fast.completions.create(
                model=str(model_dir), prompt=prompts[i % 3], temperature=0,
                max_tokens=24).choices[0].text, range(6)))
        want = [plain.completions.create(model=str(model_dir), prompt=p, temperature=0,
                                         max_tokens=24).choices[0].text for p in prompts]
        assert got == want * 2
    finally:
        assert stop_server(proc) == 0
    assert "Traceback" not in "".join(lines)
