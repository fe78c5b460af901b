"""Load what ``llama2 serve`` serves and run it under uvicorn.

The base model is loaded once (``SharedBase``); ``--adapter-path`` adapts the default
model, each ``--adapters name=path`` is a further model on the same base weights
(``lora.twin``), and a reward model trained on that base shares its weights too.
``serve`` binds the socket first (a port in use is a one-line error), prints the URL
on stderr once uvicorn accepts connections, and on SIGTERM or Ctrl-C lets in-flight
requests finish (up to ``shutdown_timeout`` seconds, then cancels them) and returns.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import uvicorn

from llama2_mlx.errors import Llama2Error, one_line
from llama2_mlx.serve.engine import Engine
from llama2_mlx.serve.protocol import Limits

DEMO_NAME = "llama2-demo"


@dataclass
class ServeConfig:
    """What to serve and how (see ``llama2 serve --help``).

    ``max_kv_size`` bounds each sequence's context (prompt + max_tokens; default: the
    model's ``max_seq_len``); ``max_concurrency`` the sequences decoding at once;
    ``max_n`` the ``n`` and ``best_of`` of a request.
    """

    model: Optional[str] = None
    adapter_path: Optional[str] = None
    adapters: dict[str, str] = field(default_factory=dict)
    reward_model: Optional[str] = None
    safety_reward_model: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    max_kv_size: Optional[int] = None
    prompt_cache_bytes: int = 1 << 30
    max_concurrency: int = 16
    max_n: int = 16
    max_body_bytes: int = 1 << 20
    dtype: Optional[str] = None
    shutdown_timeout: float = 10.0
    prompt_lookup: Optional[int] = None  # speculative decoding of lone requests (solo.py)
    draft_model: Optional[str] = None
    num_draft_tokens: int = 6

    def check(self) -> None:
        """Raise ``Llama2Error`` for a bad option (before anything is loaded)."""
        if not 0 <= self.port <= 65535:
            raise Llama2Error(f"--port must be in 0..65535, got {self.port}")
        for name, low in (("max_concurrency", 1), ("max_n", 1), ("max_body_bytes", 1),
                          ("prompt_cache_bytes", 0)):
            if getattr(self, name) < low:
                raise Llama2Error(f"--{name.replace('_', '-')} must be >= {low}, "
                                  f"got {getattr(self, name)}")
        if self.max_kv_size is not None and self.max_kv_size < 2:
            raise Llama2Error(f"--max-kv-size must be >= 2, got {self.max_kv_size}")
        if self.safety_reward_model is not None and self.reward_model is None:
            raise Llama2Error("--safety-reward-model needs --reward-model (the helpfulness one)")
        if self.api_key is not None and not self.api_key.strip():
            raise Llama2Error("--api-key is empty")
        for name in ("prompt_lookup", "num_draft_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise Llama2Error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.prompt_lookup is not None and self.draft_model is not None:
            raise Llama2Error("give --prompt-lookup or --draft-model, not both")

    def make_drafter(self, model):
        """The function making the drafter of each speculative request (None: off); a draft
        model is loaded now, checked against ``model``, and shared."""
        from llama2_mlx.generation.speculative import (
            ModelDrafter,
            PromptLookupDrafter,
            load_draft_model,
        )

        if self.prompt_lookup is not None:
            return lambda: PromptLookupDrafter(self.prompt_lookup)
        if self.draft_model is None:
            return None
        drafter = ModelDrafter(load_draft_model(self.draft_model, self.dtype))
        drafter.check(model)
        return lambda: drafter


def parse_adapter_specs(specs: Optional[Sequence[str]]) -> dict[str, str]:
    """``["name=path", ...]`` as {name: path}; a malformed or repeated name is an error."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise Llama2Error(f"--adapters {spec!r}: expected NAME=PATH")
        if name in out:
            raise Llama2Error(f"--adapters: the name {name!r} is given twice")
        out[name] = path
    return out


@dataclass
class Served:
    """The loaded models: ``models`` {name: (model, tokenizer)}, the default first;
    ``reward_model`` the helpfulness reward model, ``scorer`` what best_of scores with
    (the reward model, or a ``gate.RewardScorer`` of it and the safety model)."""

    models: dict
    tokenizer: object
    reward_model: object
    limits: Limits
    scorer: object = None
    drafter: object = None  # makes the Drafter of a speculative request (None: off)

    @property
    def names(self) -> list[str]:
        return list(self.models)


def load_served(config: ServeConfig, note: Optional[Callable[[str], None]] = None) -> Served:
    from llama2_mlx.checkpoints.shared import SharedBase
    from llama2_mlx.demo import model_or_demo

    path = model_or_demo(config.model, note)
    base = SharedBase.load(path, dtype=config.dtype)
    name = config.model if config.model is not None else DEMO_NAME
    if name in config.adapters:
        raise Llama2Error(f"--adapters: {name!r} is the base model's name")
    default = base.policy(config.adapter_path) if config.adapter_path else (base.model, base.tokenizer)
    models = {name: default}
    for adapter, adapter_path in config.adapters.items():
        models[adapter] = base.policy(adapter_path)
    rm = scorer = None
    if config.reward_model is not None:
        from llama2_mlx.rlhf.gate import load_scorer

        scorer = load_scorer(config.reward_model, config.safety_reward_model, dtype=config.dtype,
                             shared=base)
        rm = scorer.helpful
        if not scorer.gated:
            scorer = rm
    context = base.model.args.max_seq_len
    if config.max_kv_size is not None:
        context = min(context, config.max_kv_size)
    return Served(models, base.tokenizer, rm, Limits(context=context, max_n=config.max_n), scorer,
                  config.make_drafter(base.model))


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise Llama2Error(f"cannot listen on {host}:{port} ({one_line(e)})") from None
    sock.set_inheritable(True)
    return sock


class Server:
    """The models of ``config`` behind the app, on a bound socket (``url``)."""

    def __init__(self, config: ServeConfig, note: Optional[Callable[[str], None]] = None,
                 served: Optional[Served] = None):
        from llama2_mlx.serve.app import create_app

        config.check()
        self.config = config
        self.note = note or (lambda s: None)
        self.sock = _bind(config.host, config.port)  # a port in use fails before the load
        try:
            self.served = served or load_served(config, note)
        except BaseException:
            self.sock.close()
            raise
        self.engine = Engine(self.served.models, max_concurrency=config.max_concurrency,
                             prompt_cache_bytes=config.prompt_cache_bytes,
                             reward_model=self.served.scorer or self.served.reward_model,
                             drafter=self.served.drafter,
                             num_draft_tokens=config.num_draft_tokens)
        app = create_app(self.engine, self.served.tokenizer, self.served.names,
                         self.served.limits, api_key=config.api_key,
                         max_body_bytes=config.max_body_bytes)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        uv_config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                   timeout_graceful_shutdown=config.shutdown_timeout)
        self._uvicorn = _Uvicorn(uv_config)
        self._uvicorn.ready = self._ready
        self._thread: Optional[threading.Thread] = None
        self.started = threading.Event()

    def _ready(self) -> None:
        self.started.set()
        self.note(f"llama2 serve: listening on {self.url} (models: {', '.join(self.served.names)})")

    def run(self) -> None:
        """Serve until SIGTERM or Ctrl-C (on the main thread) or ``stop``."""
        self.engine.start()
        try:
            with _exit_quietly_on_signals():
                self._uvicorn.run(sockets=[self.sock])
        finally:
            self.engine.stop()
            self.sock.close()
            self.note("llama2 serve: stopped")

    def start_in_thread(self, timeout: float = 60.0) -> "Server":
        """Serve from a thread (tests, benchmarks); returns once it accepts connections."""
        self._thread = threading.Thread(target=self.run, name="llama2-serve", daemon=True)
        self._thread.start()
        if not self.started.wait(timeout):
            raise Llama2Error(f"the server did not start within {timeout} s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


def serve(config: ServeConfig, note: Optional[Callable[[str], None]] = None) -> None:
    """``llama2 serve``: load, bind, serve until SIGTERM or Ctrl-C."""
    Server(config, note).run()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling ``ready`` once it accepts connections."""

    ready: Optional[Callable[[], None]] = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.ready is not None:
            self.ready()


@contextlib.contextmanager
def _exit_quietly_on_signals():
    """uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the
    handler it found; that handler here ends the process with status 0 (not killed
    by the signal, nor a KeyboardInterrupt traceback)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(sig, frame):
        raise SystemExit(0)

    saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
