"""``llama2 eval``: the NLL and perplexity of a base model and its adapters on a JSONL
file, with bootstrap intervals; ``llama2 lm-eval``: lm-evaluation-harness with the
``llama2-mlx`` model type registered."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from cli.common import DATA as _D
from cli.common import DType, add_command, cli_errors, dtype_name, eprint, opt

_E = "Evaluation"


@cli_errors
def eval_(
    model: Annotated[str, opt("Base model folder or Hugging Face repo id.", _D, "--model", "-m")],
    data: Annotated[str, opt("JSONL file of lora-train records (prompt/completion, messages or text).", _D)],
    adapter_path: Annotated[Optional[list[str]], opt("LoRA adapter folder to compare with the base (repeat for several).", _D, "--adapter-path")] = None,
    max_seq_length: Annotated[int, opt("Longest record in tokens, as in lora-train.", _D)] = 2048,
    long_samples: Annotated[str, opt("Records longer than that: error, truncate or skip.", _D)] = "error",
    batch_size: Annotated[int, opt("Records per batch (length-sorted, one record a row).", _E)] = 8,
    per_record: Annotated[Optional[str], opt("Write each record's losses to this JSONL file.", _E)] = None,
    as_json: Annotated[bool, opt("Print JSON instead of the table.", _E, "--json")] = False,
    resamples: Annotated[int, opt("Bootstrap resamples of the records.", _E)] = 1000,
    level: Annotated[float, opt("Coverage of the bootstrap intervals.", _E)] = 0.95,
    seed: Annotated[int, opt("Seed of the bootstrap draws.", _E)] = 0,
    dtype: Annotated[Optional[DType], opt("Compute dtype (default: the checkpoint's).", _E)] = None,
    no_progress: Annotated[bool, opt("Hide the progress bar.", _E, "--no-progress")] = False,
) -> None:
    """Mean NLL and perplexity of the base and each adapter on a data file (the answer
    tokens, as lora-train's loss counts them), with 95% bootstrap intervals and each
    adapter's paired difference to the base."""
    from llama2_mlx.eval.report import EvalOptions, evaluate_file

    report = evaluate_file(EvalOptions(
        model=model, data=data, adapter_paths=adapter_path or (), max_seq_length=max_seq_length,
        batch_size=batch_size, long_samples=long_samples, dtype=dtype_name(dtype),
        resamples=resamples, seed=seed, level=level, progress=not no_progress,
    ), log=eprint)
    if per_record is not None:
        report.write_per_record(per_record)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())


@cli_errors
def lm_eval(ctx: typer.Context) -> None:
    """lm-evaluation-harness's command line with the llama2-mlx model type registered
    (needs the eval extra: lm_eval 0.4.13). Every argument goes to lm-eval (-h: its help), e.g.
    llama2 lm-eval --model llama2-mlx --model_args model=M,adapter_path=A --tasks hellaswag"""
    from llama2_mlx.errors import Llama2Error

    try:
        from llama2_mlx.eval.harness import main
    except ImportError as e:
        raise Llama2Error(str(e)) from None
    main(ctx.args)


def register(app: typer.Typer) -> None:
    add_command(app, "eval", eval_)
    add_command(app, "lm-eval", lm_eval, context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True})
