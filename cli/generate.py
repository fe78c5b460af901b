"""``llama2 generate`` and ``llama2 chat``."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from cli.common import DType, cli_errors, dtype_name, eprint
from cli.options import AdapterOpt, DemoModelOpt, DTypeOpt

SystemOpt = Annotated[Optional[str], typer.Option(help="System prompt (implies --chat).")]
MaxTokensOpt = Annotated[int, typer.Option(help="Most tokens to generate per answer.")]
TempOpt = Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass, Meta's top-p (1 = off).")]
TopKOpt = Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).")]
MinPOpt = Annotated[float, typer.Option(help="Keep tokens >= min-p times the top probability.")]
RepPenOpt = Annotated[Optional[float], typer.Option(help="Repetition penalty, e.g. 1.1.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed for reproducible sampling.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(help="Stop at this string (repeatable).")]
KVOpt = Annotated[Optional[int], typer.Option(help="Bound the KV cache to N tokens.")]


def _load(model: Optional[str], dtype: Optional[DType], adapter_path: Optional[str]):
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.demo import model_or_demo
    from llama2_mlx.io.distributed import world

    if world().size > 1:  # under mlx.launch: the model is cut across the ranks
        from llama2_mlx.generation.parallel import load_for_generation

        return load_for_generation(model_or_demo(model, eprint), world(),
                                   dtype=dtype_name(dtype), adapter_path=adapter_path)
    return load(model_or_demo(model, eprint), dtype=dtype_name(dtype), adapter_path=adapter_path)


def _parallel(config, steps=None):
    """Under mlx.launch: ``config`` with a seed all ranks share, ``steps`` watched."""
    from llama2_mlx.io.distributed import world

    if world().size == 1:
        return config if steps is None else steps
    from llama2_mlx.generation.parallel import agreed, watched

    return agreed(config, world()) if steps is None else watched(steps, world())


def _config(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed, stop, max_kv_size):
    from llama2_mlx.generation.generate import GenerationConfig

    config = GenerationConfig(
        max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []),
        max_kv_size=max_kv_size,
    )
    config.check()  # before the (slow) model load
    return config


@cli_errors
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text.")],
    model: DemoModelOpt = None, system: SystemOpt = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the Llama 2 chat format.")] = False,
    max_tokens: MaxTokensOpt = 256, temp: TempOpt = 0.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0, repetition_penalty: RepPenOpt = None, seed: SeedOpt = None,
    stop: StopOpt = None, dtype: DTypeOpt = None, adapter_path: AdapterOpt = None,
    max_kv_size: KVOpt = None,
) -> None:
    """Generate text for one prompt: the text streams to stdout, statistics to stderr."""
    from llama2_mlx.generation.generate import format_stats, prompt_ids, stream_generate

    config = _config(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed, stop,
                     max_kv_size)
    net, tokenizer = _load(model, dtype, adapter_path)
    config = _parallel(config)
    stream = stream_generate(net, tokenizer, prompt_ids(tokenizer, prompt, system, chat), config)
    for r in _parallel(config, stream):
        typer.echo(r.text, nl=False)
    typer.echo()
    eprint(format_stats(r))


def _read_turn() -> Optional[str]:
    print(">>> ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline() or None


@cli_errors
def chat(
    model: DemoModelOpt = None, system: SystemOpt = None, max_tokens: MaxTokensOpt = 512,
    temp: TempOpt = 0.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0, min_p: MinPOpt = 0.0,
    repetition_penalty: RepPenOpt = None, seed: SeedOpt = None, dtype: DTypeOpt = None,
    adapter_path: AdapterOpt = None, max_kv_size: KVOpt = None,
) -> None:
    """Interactive multi-turn chat (/reset clears the history, /quit or end of input exits)."""
    from llama2_mlx.generation.generate import ChatSession, chat_loop

    config = _config(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed, None,
                     max_kv_size)
    net, tokenizer = _load(model, dtype, adapter_path)
    config = _parallel(config)
    eprint("chat: /reset clears the history, /quit exits")
    write = lambda text: typer.echo(text, nl=False)  # noqa: E731
    chat_loop(ChatSession(net, tokenizer, config, system), _read_turn, write, eprint)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("chat")(chat)
