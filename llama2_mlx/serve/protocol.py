"""Requests of the OpenAI API: their schemas, validation, and the OpenAI error object.

Every bad request is an ``APIError`` (HTTP 400 unless said otherwise) whose body is
``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the field at
fault. Field semantics follow the OpenAI API reference (``temperature`` defaults to 1,
``max_tokens`` of a completion to 16, of a chat to what is left of the context, ...);
``top_k``, ``min_p`` and ``repetition_penalty`` are extensions (as in mlx-lm).
A chat is encoded exactly as Meta's ``chat_completion`` (``Tokenizer.encode_chat``)
and stops at the chat-format tags as well (an answer holding one could not be sent
back in the next turn); a completion's prompt is text after BOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama2_mlx.chat.tokenizer import SPECIAL_TAGS, validate_messages
from llama2_mlx.errors import Llama2Error
from llama2_mlx.generation.generate import GenerationConfig

MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_TOP_LOGPROBS = 20  # chat; completions take logprobs up to 5
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """A request the server refuses, as the OpenAI API reports it."""

    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----------------------------------------------------------------------------- schemas


class _Strict(BaseModel):
    # Unknown fields are refused, and types are not coerced ("1" is not a number).
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    # Accepted only at their no-op values (clients send them by default).
    user: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    best_of: Optional[int] = Field(None, ge=1)
    echo: Optional[bool] = None
    suffix: Optional[str] = None


# ----------------------------------------------------------------------------- validation


@dataclass
class Limits:
    """What the server allows: tokens per sequence (prompt + max_tokens) and the cap on
    ``n`` and ``best_of``."""

    context: int
    max_n: int = 16


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    kind: str  # "chat" or "completion"
    model: str
    prompt: list[int]
    config: GenerationConfig
    n: int = 1
    best_of: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _param(loc) -> str:
    """``messages[0].role`` from pydantic's location (union branch tags left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TYPE_TAGS and "[" not in part:
            out += f".{part}" if out else part
    return out


def parse(schema: type[_Strict], body: dict) -> _Strict:
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        # The deepest error is the most telling one (of the branches of a union, the one
        # the value nearly matched).
        err = max(e.errors(), key=lambda x: len(x["loc"]))
        param = _param(err["loc"])
        if err["type"] == "extra_forbidden":
            raise APIError(f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise APIError(f"Missing required parameter: {param}", param=param,
                           code="missing_required_parameter") from None
        raise APIError(f"{param}: {err['msg']}", param=param, code="invalid_type"
                       if err["type"].endswith("_type") else "invalid_value") from None


def _refuse_unsupported(req: _Common) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            raise APIError(f"{name} is not supported (only 0)", param=name, code="unsupported_value")
    if req.logit_bias:
        raise APIError("logit_bias is not supported", param="logit_bias", code="unsupported_value")


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(f"stop: at most {MAX_STOP} stop sequences, got {len(stops)}", param="stop")
    return stops


def _model(req: _Common, models: list[str]) -> str:
    name = req.model or models[0]
    if name not in models:
        raise APIError(f"The model `{name}` does not exist (served: {', '.join(models)})",
                       status=404, param="model", code="model_not_found")
    return name


def _max_tokens(asked: Optional[int], default: Optional[int], prompt_len: int, limits: Limits,
                prompt_param: str, param: str) -> int:
    room = limits.context - prompt_len
    if room < 1:
        raise APIError(
            f"The prompt has {prompt_len} tokens, which leaves no room in the context of "
            f"{limits.context} tokens", param=prompt_param, code="context_length_exceeded")
    if asked is None:
        return room if default is None else min(default, room)
    if asked > room:
        raise APIError(
            f"{param}: {prompt_len} prompt tokens + {asked} new tokens exceed the context "
            f"of {limits.context} tokens", param=param, code="context_length_exceeded")
    return asked


def _config(req: _Common, max_tokens: int, stops: list[str]) -> GenerationConfig:
    config = GenerationConfig(
        max_tokens=max_tokens, temp=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
        min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty, seed=req.seed,
        stop=stops,
    )
    try:
        config.check()
    except Llama2Error as e:  # the schema's bounds should have caught it
        raise APIError(str(e)) from None
    return config


def _n(req: _Common, limits: Limits) -> int:
    n = req.n or 1
    if n > limits.max_n:
        raise APIError(f"n: at most {limits.max_n}, got {n}", param="n", code="invalid_value")
    return n


def prepare_chat(body: dict, tokenizer, models: list[str], limits: Limits) -> Prepared:
    """A ``/v1/chat/completions`` body, checked and encoded (``models[0]``: the default)."""
    req = parse(ChatRequest, body)
    _refuse_unsupported(req)
    model = _model(req, models)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        validate_messages(messages, where="messages")
        if messages[-1]["role"] != "user":
            raise Llama2Error("messages: the last message must be from the user")
        ids = tokenizer.encode_chat(messages)
    except Llama2Error as e:
        raise APIError(str(e), param="messages", code="invalid_messages") from None
    if req.top_logprobs and not req.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    asked = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    max_tokens = _max_tokens(asked, None, len(ids), limits, "messages", param)
    stops = _stops(req.stop)
    return Prepared(
        "chat", model, ids, _config(req, max_tokens, stops + list(SPECIAL_TAGS)), n=_n(req, limits),
        logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0,
        stream=bool(req.stream), include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def prepare_completion(body: dict, tokenizer, models: list[str], limits: Limits) -> Prepared:
    """A ``/v1/completions`` body, checked and encoded (text after BOS)."""
    req = parse(CompletionRequest, body)
    _refuse_unsupported(req)
    if req.echo:
        raise APIError("echo is not supported", param="echo", code="unsupported_value")
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix", code="unsupported_value")
    model = _model(req, models)
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError("prompt: one prompt per request (a string or a list of one string)",
                           param="prompt", code="invalid_value")
        prompt = prompt[0]
    ids = tokenizer.encode(prompt, bos=True)
    n = _n(req, limits)
    best_of = req.best_of
    if best_of is not None:
        if best_of > limits.max_n:
            raise APIError(f"best_of: at most {limits.max_n}, got {best_of}", param="best_of",
                           code="invalid_value")
        if best_of < n:
            raise APIError(f"best_of ({best_of}) must be at least n ({n})", param="best_of",
                           code="invalid_value")
        if req.stream:
            raise APIError("best_of cannot be combined with stream", param="best_of",
                           code="invalid_value")
    max_tokens = _max_tokens(req.max_tokens, COMPLETION_MAX_TOKENS, len(ids), limits, "prompt",
                             "max_tokens")
    return Prepared(
        "completion", model, ids, _config(req, max_tokens, _stops(req.stop)), n=n,
        best_of=best_of, logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0,
        stream=bool(req.stream), include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )
