"""``llama2 generate`` and ``llama2 chat``."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Annotated, Optional

import typer

from cli.common import DType, add_command, cli_errors, dtype_name, eprint
from cli.options import (
    CHAT_DEFAULTS,
    DRAFT_MODEL,
    GEN_DEFAULTS,
    MAX_KV_SIZE,
    MIN_P,
    NUM_DRAFT_TOKENS,
    PROMPT_LOOKUP,
    REPETITION_PENALTY,
    SAMPLING_SEED,
    TEMP,
    TOP_K,
    TOP_P,
    AdapterOpt,
    DemoModelOpt,
    DTypeOpt,
    field_option,
    given,
)
from llama2_mlx.errors import OptionError

SystemOpt = Annotated[Optional[str], typer.Option(help="System prompt (implies --chat).")]


def _load(model: Optional[str], dtype: Optional[DType], adapter_path: Optional[str]):
    """(model, tokenizer, whether the folder carries a chat template)."""
    from llama2_mlx.chat.tokenizer import carries_chat_template
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.demo import model_or_demo
    from llama2_mlx.io.distributed import world
    from llama2_mlx.io.hub import resolve

    folder = resolve(model_or_demo(model, eprint))
    if world().size > 1:  # under mlx.launch: the model is cut across the ranks
        from llama2_mlx.generation.parallel import load_for_generation

        net, tokenizer = load_for_generation(folder, world(), dtype=dtype_name(dtype),
                                             adapter_path=adapter_path)
    else:
        net, tokenizer = load(folder, dtype=dtype_name(dtype), adapter_path=adapter_path)
    return net, tokenizer, carries_chat_template(folder)


def _drafter(config, net, dtype: Optional[DType]):
    """The drafter of ``--prompt-lookup`` / ``--draft-model`` (None: plain decoding), checked
    against the model before anything is generated."""
    from llama2_mlx.generation.speculative import ModelDrafter, PromptLookupDrafter, load_draft_model

    if config.prompt_lookup is not None:
        return PromptLookupDrafter(config.prompt_lookup)
    if config.draft_model is None:
        return None
    drafter = ModelDrafter(load_draft_model(config.draft_model, dtype_name(dtype)),
                           config.prefill_step)
    drafter.check(net)
    return drafter


def _parallel(config, steps=None):
    """Under mlx.launch: ``config`` with a seed all ranks share, ``steps`` watched."""
    from llama2_mlx.io.distributed import world

    if world().size == 1:
        return config if steps is None else steps
    from llama2_mlx.generation.parallel import agreed, watched

    return agreed(config, world()) if steps is None else watched(steps, world())


def _config(defaults, **options):
    config = dataclasses.replace(defaults, **given(**options))
    config.check()  # before the (slow) model load
    return config


def _prompts(prompt: list[str], prompts_file: Optional[str], system: Optional[str]) -> list[list[dict]]:
    """Every prompt as chat messages: the ``--prompt`` texts ('-': stdin), then the
    prompts of ``--prompts-file``."""
    from llama2_mlx.chat.records import read_prompts

    if prompt.count("-") > 1:
        raise OptionError("{prompt} - reads stdin once; give it once")
    texts = [sys.stdin.read().rstrip("\n") if p == "-" else p for p in prompt]
    head = [{"role": "system", "content": system}] if system else []
    out = [head + [{"role": "user", "content": t}] for t in texts]
    for messages in read_prompts(prompts_file) if prompts_file is not None else []:
        if system and messages[0]["role"] != "system":
            messages = head + messages
        out.append(messages)
    if not out:
        raise OptionError("give {prompt} (repeat it for a batch) or {prompts_file}")
    return out


def _ids(tokenizer, messages: list[dict], chat: bool, raw_asked: bool, n: int) -> list[int]:
    if chat:
        return tokenizer.encode_chat(messages)
    if len(messages) > 1:
        how = "not {chat}" if raw_asked else "give {chat}"
        raise OptionError("prompt {n} is a dialog of {m} messages: it needs the chat format, "
                          + how, n=n, m=len(messages))
    return tokenizer.encode(messages[0]["content"], bos=True)


def _record(messages: list[dict], response: str) -> dict:
    """A prompt and its response as a JSONL record (what reward-score reads)."""
    one = len(messages) == 1
    return {"prompt": messages[0]["content"] if one else messages, "response": response}


@cli_errors
def generate(
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", help="Prompt text ('-': read it from stdin); repeat it for a batch.")] = None,
    prompts_file: Annotated[Optional[str], typer.Option(
        help="JSONL of prompts (prompt / messages records) to run as one batch.")] = None,
    model: DemoModelOpt = None, system: SystemOpt = None,
    chat: Annotated[Optional[bool], typer.Option(
        "--chat/--raw", help="Apply the Llama 2 chat format, or send the text as is (default: "
        "the chat format for a model folder that carries a chat template).",
        show_default=False)] = None,
    max_tokens: Optional[int] = field_option(GEN_DEFAULTS, "max_tokens"),
    temp: Optional[float] = TEMP, top_p: Optional[float] = TOP_P, top_k: Optional[int] = TOP_K,
    min_p: Optional[float] = MIN_P, repetition_penalty: Optional[float] = REPETITION_PENALTY,
    seed: Optional[int] = SAMPLING_SEED,
    stop: Optional[list[str]] = field_option(GEN_DEFAULTS, "stop"),
    dtype: DTypeOpt = None, adapter_path: AdapterOpt = None,
    max_kv_size: Optional[int] = MAX_KV_SIZE, prompt_lookup: Optional[int] = PROMPT_LOOKUP,
    draft_model: Optional[str] = DRAFT_MODEL, num_draft_tokens: Optional[int] = NUM_DRAFT_TOKENS,
) -> None:
    """Generate text for a prompt: the text streams to stdout, statistics to stderr. With
    several prompts (one batch) stdout gets a JSON line per prompt: its prompt and response."""
    if chat is False and system is not None:
        raise OptionError("{system} needs the chat format, not {chat}")
    config = _config(GEN_DEFAULTS, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
                     min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                     max_kv_size=max_kv_size, prompt_lookup=prompt_lookup, draft_model=draft_model,
                     num_draft_tokens=num_draft_tokens)
    prompts = _prompts(list(prompt or []), prompts_file, system)
    net, tokenizer, templated = _load(model, dtype, adapter_path)
    single = len(prompts) == 1 and prompts_file is None
    drafter = _drafter(config, net, dtype) if single else None
    if config.speculative and not single:
        eprint("note: speculative decoding runs one prompt at a time: the batch decodes plainly")
    raw_asked = chat is False
    if chat is None:
        chat = templated or system is not None
    if chat:
        from llama2_mlx.chat.tokenizer import SPECIAL_TAGS

        config.stop = list(config.stop) + list(SPECIAL_TAGS)  # an answer ends at a chat tag
    config = _parallel(config)
    ids = [_ids(tokenizer, p, chat, raw_asked, n) for n, p in enumerate(prompts, 1)]
    if single:
        _stream(net, tokenizer, ids[0], config, chat, drafter)
    else:
        _batch(net, tokenizer, prompts, ids, config, chat)


def _stream(net, tokenizer, ids, config, chat: bool, drafter=None) -> None:
    from llama2_mlx.generation.chat import StreamStrip, format_stats
    from llama2_mlx.generation.generate import stream_generate

    strip = StreamStrip() if chat else None
    speculative = {"drafter": drafter} if drafter is not None else {}
    for r in _parallel(config, stream_generate(net, tokenizer, ids, config, **speculative)):
        typer.echo(strip.add(r.text) if strip else r.text, nl=False)
    typer.echo()
    eprint(format_stats(r))


def _batch(net, tokenizer, prompts, ids, config, chat: bool) -> None:
    from llama2_mlx.chat.records import cut_answer
    from llama2_mlx.generation.generate import batch_generate
    from llama2_mlx.io.progress import peak_memory_gb

    tic = time.perf_counter()
    outs = batch_generate(net, tokenizer, ids, config)
    seconds = time.perf_counter() - tic
    for messages, out in zip(prompts, outs):
        text = cut_answer(tokenizer.decode(out), config.stop)[0]
        typer.echo(json.dumps(_record(messages, text.strip() if chat else text), ensure_ascii=False))
    n = sum(map(len, outs))
    eprint(f"{len(ids)} prompts in one batch: {n} tokens generated in {seconds:.2f}s "
           f"({n / seconds if seconds else 0:.2f} tok/s), peak memory {peak_memory_gb():.3f} GB")


def _read_turn() -> Optional[str]:
    print(">>> ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline() or None


@cli_errors
def chat(
    model: DemoModelOpt = None, system: SystemOpt = None,
    max_tokens: Optional[int] = field_option(CHAT_DEFAULTS, "max_tokens"),
    temp: Optional[float] = TEMP, top_p: Optional[float] = TOP_P, top_k: Optional[int] = TOP_K,
    min_p: Optional[float] = MIN_P, repetition_penalty: Optional[float] = REPETITION_PENALTY,
    seed: Optional[int] = SAMPLING_SEED, dtype: DTypeOpt = None,
    adapter_path: AdapterOpt = None, max_kv_size: Optional[int] = MAX_KV_SIZE,
    prompt_lookup: Optional[int] = PROMPT_LOOKUP, draft_model: Optional[str] = DRAFT_MODEL,
    num_draft_tokens: Optional[int] = NUM_DRAFT_TOKENS,
) -> None:
    """Interactive multi-turn chat (/help lists the commands; /quit or end of input exits)."""
    from llama2_mlx.generation.chat import CHAT_HELLO, ChatSession, chat_loop

    config = _config(CHAT_DEFAULTS, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
                     min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                     max_kv_size=max_kv_size, prompt_lookup=prompt_lookup,
                     draft_model=draft_model, num_draft_tokens=num_draft_tokens)
    net, tokenizer, _ = _load(model, dtype, adapter_path)
    drafter = _drafter(config, net, dtype)
    config = _parallel(config)
    eprint(CHAT_HELLO)
    write = lambda text: typer.echo(text, nl=False)  # noqa: E731
    session = ChatSession(net, tokenizer, config, system, drafter=drafter)
    chat_loop(session, _read_turn, write, eprint)


def register(app: typer.Typer) -> None:
    add_command(app, "generate", generate)
    add_command(app, "chat", chat)
