"""Progress with an ETA for long jobs (evaluation sets, packing, export).

On a terminal: one line rewritten in place (carriage return), e.g.

    embed ijbc: 120448/469375 images 812 images/s ETA 7m09s

When stdout is not a terminal (a log file, a pipe, a batch job): a plain line every
``every_seconds`` seconds, so logs stay readable. Both end with one final line giving the count
and the time taken. The ETA reads like the training line's (``ETA 4m23s``): the remaining count
at the average rate so far.

    with Progress("pack faces", total=len(paths)) as progress:
        for path in paths:
            ...
            progress.update()

The clock, the stream and the terminal test are arguments, so tests drive it without timing.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_duration(seconds: float) -> str:
    """4m23s (the training line's ETA format); 1h05m02s from an hour on."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


class Progress:
    """Counts work done towards `total` and reports it with a rate and an ETA."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "images",
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        is_tty: bool | None = None,
        every_seconds: float = 30.0,
        tty_every_seconds: float = 0.2,
        enabled: bool = True,
    ):
        self.label, self.total, self.unit = label, int(total), unit
        self.stream = stream if stream is not None else sys.stdout
        if is_tty is None:
            isatty = getattr(self.stream, "isatty", None)
            is_tty = bool(isatty and isatty())
        self.is_tty, self.enabled, self.clock = is_tty, enabled, clock
        self.every = tty_every_seconds if is_tty else every_seconds
        self.done, self.note = 0, ""
        self.start = clock()
        self._last_report = self.start
        self._width = 0  # of the last line written in place (to blank its leftovers)
        self._closed = False

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Remaining count at the average rate so far (None before anything is done)."""
        if self.done <= 0:
            return None
        elapsed = (self.clock() if now is None else now) - self.start
        return max(0, self.total - self.done) * elapsed / self.done

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        text = f"{self.label}: {self.done}/{self.total} {self.unit}"
        elapsed = now - self.start
        if self.done > 0 and elapsed > 0:
            text += f" {self.done / elapsed:.1f} {self.unit}/s"
        eta = self.eta_seconds(now)
        text += f" ETA {format_duration(eta)}" if eta is not None else " ETA ?"
        return text + (f" ({self.note})" if self.note else "")

    def update(self, n: int = 1, note: str | None = None) -> None:
        """Adds `n` to the count (and replaces the note shown in brackets, when given)."""
        self.done += n
        if note is not None:
            self.note = note
        now = self.clock()
        if self.enabled and now - self._last_report >= self.every:
            self._write(self.line(now))
            self._last_report = now

    def close(self) -> None:
        """Writes the final line (once): count, time taken and the average rate."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        elapsed = self.clock() - self.start
        text = f"{self.label}: {self.done}/{self.total} {self.unit} in {format_duration(elapsed)}"
        if self.done > 0 and elapsed > 0:
            text += f" ({self.done / elapsed:.1f} {self.unit}/s)"
        if self.note:
            text += f" ({self.note})"
        self._write(text, final=True)

    def _write(self, text: str, final: bool = False) -> None:
        if self.is_tty:
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.is_tty and self._width:
            self.stream.write("\n")  # leave the partial line; the error starts on its own
            self.stream.flush()
            self._closed = True
            return
        if exc_type is None:
            self.close()
