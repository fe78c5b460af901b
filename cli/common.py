"""Shared CLI plumbing: one-line errors instead of tracebacks."""

from __future__ import annotations

import functools
import sys

import typer

from llama2_mlx.errors import Llama2Error


def cli_errors(fn):
    """Turn library errors into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Llama2Error as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def eprint(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)
