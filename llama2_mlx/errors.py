"""The one exception type the library raises for bad input.

Its message is a single line that names the file, line, tensor or option at
fault; the CLI prints it as ``error: <message>`` and exits with status 2.
"""


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
