"""``llama2 serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import DType, add_command, cli_errors, dtype_name, eprint
from cli.options import field_help
from llama2_mlx.generation.generate import GenerationConfig

_MODELS, _LIMITS, _SPEC = "Models", "Limits", "Speculative decoding (requests of one sequence)"


@cli_errors
def serve(
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Model folder or Hugging Face repo id (default: the bundled demo "
        "model, served as 'llama2-demo').", rich_help_panel=_MODELS)] = None,
    adapter_path: Annotated[Optional[str], typer.Option(
        help="LoRA adapters applied to the default model.", rich_help_panel=_MODELS)] = None,
    adapters: Annotated[Optional[list[str]], typer.Option(
        help="A further model NAME=PATH: the base with the LoRA adapters in PATH, chosen by "
        "the request's 'model' (repeatable).", rich_help_panel=_MODELS)] = None,
    reward_model: Annotated[Optional[str], typer.Option(
        help="Reward model folder (reward-train): best_of picks by its reward.",
        rich_help_panel=_MODELS)] = None,
    safety_reward_model: Annotated[Optional[str], typer.Option(
        help="Safety reward model folder (reward-train --kind safety): best_of then picks by "
        "the paper's gate (the safety score if it is below 0.15, else the helpfulness one; "
        "both probabilities).", rich_help_panel=_MODELS)] = None,
    dtype: Annotated[Optional[DType], typer.Option(
        help="Compute dtype (default: checkpoint's).", rich_help_panel=_MODELS)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="LLAMA2_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on /v1 requests.")] = None,
    max_kv_size: Annotated[Optional[int], typer.Option(
        help="Most tokens per sequence, prompt + max_tokens (default: the model's context).",
        rich_help_panel=_LIMITS)] = None,
    prompt_cache_bytes: Annotated[int, typer.Option(
        help="Bytes of prompt KV cache kept across requests (LRU; 0: off).",
        rich_help_panel=_LIMITS)] = 1 << 30,
    max_concurrency: Annotated[int, typer.Option(
        help="Most sequences decoding at once as one batch (a request takes n or best_of; "
        "the rest wait).", rich_help_panel=_LIMITS)] = 16,
    prompt_lookup: Annotated[Optional[int], typer.Option(
        help=field_help(GenerationConfig, "prompt_lookup") + " Applies to a request of one "
        "sequence without logprobs while no other is decoding.", rich_help_panel=_SPEC)] = None,
    draft_model: Annotated[Optional[str], typer.Option(
        help=field_help(GenerationConfig, "draft_model"), rich_help_panel=_SPEC)] = None,
    num_draft_tokens: Annotated[int, typer.Option(
        help=field_help(GenerationConfig, "num_draft_tokens"), rich_help_panel=_SPEC)] =
        GenerationConfig.num_draft_tokens,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat and completions, streaming,
    n, best_of, logprobs); prints its URL on stderr when ready, stops on SIGTERM or Ctrl-C."""
    from llama2_mlx.serve.server import ServeConfig, parse_adapter_specs, serve as run

    config = ServeConfig(
        model=model, adapter_path=adapter_path, adapters=parse_adapter_specs(adapters),
        reward_model=reward_model, safety_reward_model=safety_reward_model, dtype=dtype_name(dtype), host=host, port=port,
        api_key=api_key, max_kv_size=max_kv_size, prompt_cache_bytes=prompt_cache_bytes,
        max_concurrency=max_concurrency, prompt_lookup=prompt_lookup, draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
    )
    config.check()  # before the (slow) model load
    run(config, eprint)


def register(app: typer.Typer) -> None:
    add_command(app, "serve", serve)
