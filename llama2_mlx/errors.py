"""The one exception type the library raises for bad input.

Its message is a single line that names the file, line, tensor or option at
fault; the CLI prints it as ``error: <message>`` and exits with status 2.

An option is named by its field (``max_tokens``), never by a command-line flag: the
library does not know how a value was given. ``OptionError`` and ``OptionText`` keep
their message as a template naming the options as ``{field}``, so the CLI can name
each one as the user typed it (``--max-tokens``); ``str()`` names the fields.
"""

from __future__ import annotations

import re
from string import Formatter
from typing import Callable, Optional


class Llama2Error(Exception):
    """Bad input (file, data line, option or checkpoint) with a one-line explanation.

    What a hostile input puts in the message (a tensor name or a file name holding a
    newline, a lone surrogate, a control character) is escaped, so the message stays one
    printable line."""

    def __str__(self) -> str:
        return printable_line(super().__str__())


def printable_line(s: str) -> str:
    """``s`` as one printable line: control characters and lone surrogates escaped, and a
    word too long for a line (a 5000-character path) cut to its start, its end and its
    length."""
    if not s.isprintable():
        s = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)
    if len(s) > 300:
        # Its start and its end: a path's file name stays readable.
        s = re.sub(r"\S{301,}", lambda m: f"{m.group()[:100]}...{m.group()[-60:]} "
                   f"({len(m.group()):,} characters)", s)
    return s


def one_line(text: object, limit: int = 160) -> str:
    """``text`` (e.g. an exception from a library) squeezed onto one line of <= ``limit``."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _option_names(template: str, values: dict) -> tuple[str, ...]:
    names = [name for _, name, _, _ in Formatter().parse(template) if name]
    return tuple(dict.fromkeys(n for n in names if n not in values))


class OptionText(str):
    """A message about options: ``template`` names each option as ``{field}`` and the
    other placeholders are ``values`` (``OptionText("{max_tokens} must be >= 1, got {got}",
    got=0)``). As a string the options are their field names; ``render`` names them
    otherwise (the CLI: as typed)."""

    template: str
    values: dict
    options: tuple[str, ...]

    def __new__(cls, template: str, **values):
        options = _option_names(template, values)
        self = super().__new__(cls, template.format(**{n: n for n in options}, **values))
        self.template, self.values, self.options = template, values, options
        return self

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each option named ``name(field)``."""
        return self.template.format(**{n: name(n) for n in self.options}, **self.values)


class OptionError(Llama2Error):
    """A bad option value (see ``OptionText``): ``options`` are the fields at fault, the
    first one also as ``option``; ``render(name)`` names them as the caller's user does."""

    def __init__(self, template: str, **values):
        self.text = OptionText(template, **values)
        self.options = self.text.options
        self.option: Optional[str] = self.options[0] if self.options else None
        super().__init__(str(self.text))

    def render(self, name: Callable[[str], str]) -> str:
        return printable_line(self.text.render(name))


# --------------------------------------------------------------------------- ranges

# Seeds are 32-bit: numpy's RandomState takes no other (the data order, the bootstrap).
SEED_RANGE = {"min": 0, "max": 2**32 - 1}


def check_number(name: str, value, *, min=None, max=None, above=None, below=None,
                 integer: bool = False) -> None:
    """Raise ``OptionError`` naming option ``name`` unless ``value`` is a finite number
    (an integer with ``integer``) within the bounds: ``min``/``max`` inclusive,
    ``above``/``below`` exclusive."""
    import math

    placeholder = "{" + name + "}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise OptionError(placeholder + " must be " + kind + " (got {got!r})", got=value)
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(placeholder + " must be a finite number (got {got})", got=value)
    # Each side: (bound, its bracket in an interval, its words alone, whether value is in).
    lower = ((min, "[", "at least", value >= min) if min is not None else
             (above, "(", "above", value > above) if above is not None else None)
    upper = ((max, "]", "at most", value <= max) if max is not None else
             (below, ")", "below", value < below) if below is not None else None)
    if lower and upper:
        if not (lower[3] and upper[3]):
            raise OptionError(placeholder + " must be in {interval} (got {got})", got=value,
                              interval=f"{lower[1]}{lower[0]}, {upper[0]}{upper[1]}")
        return
    for bound, _, words, inside in filter(None, (lower, upper)):
        if not inside:
            raise OptionError(placeholder + " must be " + words + " {bound} (got {got})",
                              bound=bound, got=value)


RANGE_KEYS = ("min", "max", "above", "below")


def check_fields(obj) -> None:
    """Check every field of dataclass ``obj`` whose metadata gives a range (``min``,
    ``max``, ``above``, ``below``: see ``check_number``); None values are unset options.
    The range is written once, beside the field's default and help."""
    import dataclasses

    for f in dataclasses.fields(obj):
        bounds = {k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata}
        value = getattr(obj, f.name)
        if bounds and value is not None:
            kind = str(f.type)  # "int", "Optional[float]" (annotations are strings here)
            check_number(f.name, value, integer="int" in kind and "float" not in kind, **bounds)
