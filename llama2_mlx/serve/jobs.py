"""What the HTTP side and the engine exchange: a ``Job`` (one request) and the events
the engine sends back for it (``Delta``/``Finish`` for each choice, then ``Done`` or
``Failed``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from llama2_mlx.generation.generate import GenerationConfig


@dataclass
class TokenInfo:
    """A sampled token's log-probability and the most likely alternatives (id, logprob)."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New text of choice ``index`` and the tokens it came from (with logprobs wanted)."""

    index: int
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)


@dataclass
class Finish:
    index: int
    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    reward: Optional[float] = None  # best_of with a reward model


@dataclass
class Done:
    """The last event of a request that succeeded."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    """The last event of a request the engine could not serve."""

    status: int
    message: str


@dataclass
class Job:
    """One request: prompt ids, options, and ``emit``, called on the engine thread with
    lists of events (``Delta``/``Finish`` of the choices ..., the last one ``Done`` or
    ``Failed``): one list per decode step while ``stream``, else one at the end.

    ``n`` choices; with ``best_of`` K, K samples of which the best n are returned at the
    end (by reward with a reward model, else by mean logprob).
    """

    model: str
    prompt: list[int]
    config: GenerationConfig
    emit: Callable[[list], None]
    n: int = 1
    best_of: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = True
    cancelled: bool = False

    @property
    def samples(self) -> int:
        return self.best_of or self.n
