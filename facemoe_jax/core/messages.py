"""One-line messages to the user on stderr: `error: ...`, `warning: ...` and plain notices.

Each line is one write of the text with its newline, flushed at once: other threads (a failed
TensorStore read's asyncio tracebacks, XLA's logging) may write to stderr at any moment, and
print()'s separate write of the newline let their output land inside our line.
"""

from __future__ import annotations

import sys


def one_line(text) -> str:
    """The text with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


def say(message: str) -> None:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


def warning(message: str) -> None:
    say(f"warning: {message}")


def error(message: str) -> None:
    say(f"error: {one_line(message)}")
