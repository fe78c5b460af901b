"""The one exception type the library raises for bad input.

Its message is a single line that names the file, line, tensor or option at
fault; the CLI prints it as ``error: <message>`` and exits with status 2.

An option is named by its field (``max_tokens``), never by a command-line flag: the
library does not know how a value was given. ``OptionError`` and ``OptionText`` keep
their message as a template naming the options as ``{field}``, so the CLI can name
each one as the user typed it (``--max-tokens``); ``str()`` names the fields.
"""

from __future__ import annotations

from string import Formatter
from typing import Callable, Optional


class Llama2Error(Exception):
    """Bad input (file, data line, option or checkpoint) with a one-line explanation.

    What a hostile input puts in the message (a tensor name or a file name holding a
    newline, a lone surrogate, a control character) is escaped, so the message stays one
    printable line."""

    def __str__(self) -> str:
        s = super().__str__()
        if s.isprintable():
            return s
        return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)


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
        return self.text.render(name)
