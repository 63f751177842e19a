"""facemoe_jax.messages: each line one write, so no other thread's output lands inside it."""

import sys

from facemoe_jax.core import messages


class RecordingStream:
    def __init__(self):
        self.writes, self.flushes = [], 0

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        self.flushes += 1


def test_each_message_is_one_write_with_its_newline_and_flushed(monkeypatch):
    stream = RecordingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    messages.error("config file\n  'x.py'   not found")
    messages.warning("skipping checkpoint 5")
    messages.say("SIGTERM: finishing this step")
    assert stream.writes == [
        "error: config file 'x.py' not found\n",
        "warning: skipping checkpoint 5\n",
        "SIGTERM: finishing this step\n",
    ]
    assert stream.flushes == 3


def test_one_line_takes_any_object_and_collapses_whitespace():
    assert messages.one_line(ValueError("a\n\tb  c ")) == "a b c"
    assert messages.one_line(3) == "3"
