"""Shared CLI plumbing: one-line errors instead of tracebacks, options named as typed,
the hidden aliases of options, the dtype choice and options grouped in help panels.

The library names an option by its dataclass field (``OptionError``, ``OptionText``:
``max_tokens must be >= 1``); ``flag_of`` is the one mapping from a field to the flag
the user typed (``--max-tokens``, or an alias such as ``--max-seq-len``), read from
the running command's parameters and its command line.
"""

from __future__ import annotations

import functools
import math
import sys
from contextvars import ContextVar
from enum import Enum
from typing import Any, Callable, Optional

import typer
from typer.core import TyperCommand

from llama2_mlx.errors import SEED_RANGE, Llama2Error, OptionError, OptionText, check_number

DATA, LORA, TRAINING, SAMPLING = "Data", "LoRA", "Training", "Sampling"
SPECULATIVE = "Speculative decoding"

# Hidden aliases: another spelling -> (the option's name, the commands that take it; None:
# every command that has the option). Older names of renamed options, and mlx-lm's
# names where they do not clash with ours. Not shown in --help.
ALIASES: dict[str, tuple[str, Optional[frozenset]]] = {
    "--max-seq-len": ("--max-seq-length", None),       # reward-train's old name
    "--eval-every": ("--val-every", None),             # reward-train's old name
    "--steps-per-eval": ("--val-every", None),         # mlx-lm lora
    "--steps-per-report": ("--log-every", None),       # mlx-lm lora
    "--learning-rate": ("--lr", None),                 # mlx-lm lora
    "--system-prompt": ("--system", None),             # mlx-lm generate / chat
    "--no-chat": ("--raw", None),
    "--ignore-chat-template": ("--raw", None),         # mlx-lm generate
    "--save-path": ("--out", frozenset({"fuse"})),     # mlx-lm fuse
    "--de-quantize": ("--dequantize", frozenset({"fuse"})),  # mlx-lm fuse
    "--hf-path": ("--model", frozenset({"convert"})),  # mlx-lm convert
    "--mlx-path": ("--out", frozenset({"convert"})),   # mlx-lm convert
}
_TYPED = "llama2.typed"  # ctx.meta key: option (parameter name) -> the spelling typed
# The context of the command running now (Typer's click is its own: no click globals).
_RUNNING: ContextVar[Any] = ContextVar("llama2_running_command", default=None)


def _options(command) -> list:
    return [p for p in command.params if getattr(p, "param_type_name", "") == "option"]


class Command(TyperCommand):
    """A command that takes the hidden ``ALIASES`` of its options and records how each
    option was spelled on the command line (for ``flag_of``)."""

    def invoke(self, ctx):
        token = _RUNNING.set(ctx)
        try:
            return super().invoke(ctx)
        finally:
            _RUNNING.reset(token)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        ctx.meta[_TYPED] = typed = {}
        params = {o: p for p in _options(self) for o in (*p.opts, *p.secondary_opts)}
        out, i = [], 0
        while i < len(args):
            a = args[i]
            i += 1
            if a == "--":
                out += args[i - 1:]
                break
            name, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
            if name not in params and name in ALIASES:
                canonical, commands = ALIASES[name]
                if canonical in params and (commands is None or self.name in commands):
                    a = canonical + eq + value
                    typed.setdefault(params[canonical].name, name)
                    name = canonical
            p = params.get(name)
            out.append(a)
            if p is None:
                continue
            typed.setdefault(p.name, args[i - 1].partition("=")[0])
            if not eq and not p.is_flag and not p.count and i < len(args):
                value = args[i]
                out.append(value)  # the option's value, taken as it is
                i += 1
            _refuse_non_finite(p, typed[p.name], value)
            _refuse_out_of_range(p, typed[p.name], value)
        return super().parse_args(ctx, out)


def takes_float(param) -> bool:
    """Whether a command's parameter takes a float (``float`` or ``Optional[float]``)."""
    annotation = param.type_descriptor.annotation
    return annotation is float or float in getattr(annotation, "__args__", ())


def _refuse_non_finite(param, flag: str, value: str) -> None:
    """No command takes NaN or an infinity for a number (click's FLOAT accepts both): one
    line naming the option as typed, before anything else is checked or done."""
    if not takes_float(param):
        return
    try:
        number = float(value)
    except ValueError:
        return  # click says it is no number
    if not math.isfinite(number):
        typer.echo(f"error: {flag} must be a finite number (got {number})", err=True)
        raise typer.Exit(2)


# The range of every command's option of this name (parameter), refused at parsing with
# one line naming the option as typed. Options that are dataclass fields also carry their
# range in the field's metadata (checked by the library: errors.check_fields), and some
# options are checked where they are used (--max-tokens, --port): this table is for the
# others, and names each range once for every command.
OPTION_RANGES: dict[str, dict] = {
    "seed": SEED_RANGE, "batch_size": {"min": 1}, "k": {"min": 1}, "n": {"min": 1},
    "n_eval": {"min": 0}, "n_valid": {"min": 0}, "show": {"min": 0}, "iterations": {"min": 1},
    "resamples": {"min": 1}, "level": {"above": 0, "below": 1}, "replay": {"min": 0, "max": 1},
    "max_seq_length": {"min": 2}, "prompt_cache_bytes": {"min": 0},
}


def _refuse_out_of_range(param, flag: str, value: str) -> None:
    """An option of ``OPTION_RANGES`` outside its range: one line, exit status 2."""
    bounds = OPTION_RANGES.get(param.name)
    if bounds is None or param.is_flag:
        return
    floating = takes_float(param)
    try:
        number = float(value) if floating else int(value)
    except ValueError:
        return  # click says it is no number
    try:
        check_number(param.name, number, integer=not floating, **bounds)
    except OptionError as e:
        typer.echo(f"error: {e.render(lambda field: flag)}", err=True)
        raise typer.Exit(2)


def add_command(app: typer.Typer, name: str, fn: Callable, **settings) -> None:
    """Register ``fn`` as command ``name`` of ``app`` (with the aliases and checks of
    ``Command``); ``settings`` go to ``app.command``."""
    app.command(name, cls=Command, **settings)(fn)


def flag_of(field: str) -> str:
    """How the running command's user names option ``field`` (a parameter name): the
    spelling typed, else the option's first long name; outside a command, or for a
    field that is no option of it, ``--field-name``."""
    ctx = _RUNNING.get()
    if ctx is not None:
        typed = ctx.meta.get(_TYPED, {})
        if field in typed:
            return typed[field]
        for p in _options(ctx.command):
            if p.name == field:
                longs = [o for o in p.opts if o.startswith("--")]
                return (longs or p.opts)[0]
    return "--" + field.replace("_", "-")


def user_text(message: object) -> str:
    """A message for the user: options of an ``OptionText``/``OptionError`` named as typed."""
    if isinstance(message, (OptionText, OptionError)):
        return message.render(flag_of)
    return str(message)


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def dtype_name(dtype: Optional[DType]) -> Optional[str]:
    """The library's dtype argument for a ``--dtype`` choice (None: keep the checkpoint's)."""
    return dtype.value if dtype else None


def opt(help: str, panel: str = TRAINING, *names: str):
    """A ``typer.Option`` shown in help panel ``panel``."""
    return typer.Option(*names, help=help, rich_help_panel=panel)


def cli_errors(fn):
    """Turn library errors into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Llama2Error as e:
            typer.echo(f"error: {user_text(e)}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def eprint(*parts) -> None:
    """Print a message on stderr (options named as typed, see ``user_text``)."""
    print(*(user_text(p) for p in parts), file=sys.stderr, flush=True)
