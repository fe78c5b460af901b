"""Request validation of ``llama2 serve`` without a server: defaults as the OpenAI API
defines them, the chat encoding, and the field each error names."""

from __future__ import annotations

import pytest

from llama2_mlx import demo
from llama2_mlx.chat.tokenizer import SPECIAL_TAGS, Tokenizer
from llama2_mlx.serve.protocol import APIError, Limits, prepare_chat, prepare_completion
from llama2_mlx.serve.server import ServeConfig, load_served

MODELS = ["base", "tuned"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(demo.default_model_path() / "tokenizer.model")


def user(text):
    return [{"role": "user", "content": text}]


def test_chat_defaults_encoding_and_stops(tok):
    limits = Limits(context=256)
    p = prepare_chat({"messages": user("hi"), "stop": "x"}, tok, MODELS, limits)
    assert p.model == "base" and p.prompt == tok.encode_chat(user("hi"))
    assert p.config.temp == 1.0 and p.config.top_p == 1.0  # OpenAI's defaults
    assert p.config.max_tokens == 256 - len(p.prompt)  # what is left of the context
    assert p.config.stop == ["x", *SPECIAL_TAGS] and not p.stream and p.n == 1
    parts = {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "h"},
                                                       {"type": "text", "text": "i"}]}],
             "max_tokens": 9, "max_completion_tokens": 5, "model": "tuned", "n": 2,
             "stream": True, "stream_options": {"include_usage": True}, "logprobs": True,
             "top_logprobs": 3, "temperature": 0, "frequency_penalty": 0, "user": "me"}
    p = prepare_chat(parts, tok, MODELS, limits)
    assert p.prompt == tok.encode_chat([{"role": "system", "content": "be brief"}] + user("hi"))
    assert (p.model, p.config.max_tokens, p.n, p.top_logprobs) == ("tuned", 5, 2, 3)
    assert p.stream and p.include_usage and p.logprobs and p.config.temp == 0


def test_completion_defaults(tok):
    p = prepare_completion({"prompt": ["hello"], "logprobs": 2, "best_of": 3, "n": 2}, tok,
                           MODELS, Limits(context=256))
    assert p.prompt == tok.encode("hello", bos=True) and p.config.max_tokens == 16
    assert p.config.stop == [] and p.logprobs and p.top_logprobs == 2 and p.best_of == 3
    p = prepare_completion({"prompt": ""}, tok, MODELS, Limits(context=256))
    assert p.prompt == [tok.bos_id] and not p.logprobs  # text after BOS, even none
    near = "word " * 240  # leaves fewer than 16 tokens: the default shrinks to fit
    p = prepare_completion({"prompt": near}, tok, MODELS, Limits(context=256))
    assert len(p.prompt) + p.config.max_tokens == 256


@pytest.mark.parametrize("body, param, status", [
    ({"messages": user("hi"), "model": "nope"}, "model", 404),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", 400),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "messages", 400),
    ({"messages": user("x " * 30), "max_tokens": 5}, "max_tokens", 400),
    ({"messages": user("x " * 60)}, "messages", 400),
    ({"messages": user("hi"), "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage", 400),
    ({"messages": user("hi"), "logit_bias": {"5": 1.0}}, "logit_bias", 400),
])
def test_chat_errors_name_their_field(tok, body, param, status):
    with pytest.raises(APIError) as e:
        prepare_chat(body, tok, MODELS, Limits(context=40, max_n=4))
    assert (e.value.param, e.value.status) == (param, status)
    assert e.value.body()["error"]["param"] == param


def test_max_kv_size_bounds_the_context():
    served = load_served(ServeConfig(max_kv_size=64))
    assert served.limits.context == 64 and served.names == ["llama2-demo"]
    assert load_served(ServeConfig()).limits.context == 256  # the model's max_seq_len
