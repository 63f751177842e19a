"""Progress lines: a fake clock and stream, so nothing depends on timing."""

import io

import pytest

from facemoe_jax.core.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0m00s"), (59.9, "0m59s"), (263, "4m23s"), (3600, "1h00m00s"), (3725, "1h02m05s")],
)
def test_format_duration_matches_the_training_line(seconds, text):
    assert format_duration(seconds) == text


def test_plain_lines_every_n_seconds_when_not_a_terminal():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("embed lfw", 1000, stream=out, clock=clock, is_tty=False, every_seconds=10)
    for _ in range(9):  # 100 images per second, one batch of 100 each second
        clock.now += 1
        progress.update(100)
    assert out.getvalue() == ""  # under 10 s: nothing yet
    clock.now += 1
    progress.update(100, note="gallery")
    clock.now += 5
    progress.close()
    assert out.getvalue().splitlines() == [
        "embed lfw: 1000/1000 images 100.0 images/s ETA 0m00s (gallery)",
        "embed lfw: 1000/1000 images in 0m15s (66.7 images/s) (gallery)",
    ]
    progress.close()  # closing twice writes nothing more
    assert len(out.getvalue().splitlines()) == 2


def test_eta_is_the_remaining_count_at_the_average_rate():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("pack", 469375, stream=out, clock=clock, is_tty=False, every_seconds=60)
    assert progress.eta_seconds() is None
    assert progress.line().endswith("ETA ?")
    clock.now += 60
    progress.update(1000)  # 1000 images in a minute: 468375 left -> 468.375 minutes
    assert progress.eta_seconds() == pytest.approx(468375 * 60 / 1000)
    assert out.getvalue() == "pack: 1000/469375 images 16.7 images/s ETA 7h48m22s\n"


def test_one_line_rewritten_in_place_on_a_terminal():
    clock, out = FakeClock(), io.StringIO()
    with Progress("export", 4, unit="steps", stream=out, clock=clock, is_tty=True) as progress:
        clock.now += 1
        progress.update(note="model.safetensors")
        clock.now += 1
        progress.update(3, note="")
    text = out.getvalue()
    assert "\n" not in text[:-1] and text.endswith("\n")  # one line, ended once
    parts = text.split("\r")[1:]
    assert parts[0] == "export: 1/4 steps 1.0 steps/s ETA 0m03s (model.safetensors)"
    # A shorter line blanks what is left of the longer one before it.
    assert parts[1].rstrip(" ") == "export: 4/4 steps 2.0 steps/s ETA 0m00s"
    assert len(parts[1]) == len(parts[0])
    assert parts[2] == "export: 4/4 steps in 0m02s (2.0 steps/s)\n"


def test_terminal_updates_are_rate_limited_and_disabled_writes_nothing():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("x", 100, stream=out, clock=clock, is_tty=True, tty_every_seconds=0.5)
    for _ in range(10):
        clock.now += 0.125  # exact in binary: no rounding at the 0.5 s boundaries
        progress.update()
    assert out.getvalue().count("\r") == 2  # at 0.5 s and at 1.0 s
    quiet = Progress("x", 10, stream=out, clock=clock, is_tty=False, every_seconds=0, enabled=False)
    quiet.update(10)
    quiet.close()
    assert out.getvalue().count("\r") == 2 and "\n" not in out.getvalue()


def test_an_error_leaves_the_partial_line_and_no_final_line():
    clock, out = FakeClock(), io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress("x", 10, stream=out, clock=clock, is_tty=True) as progress:
            clock.now += 1
            progress.update()
            raise RuntimeError("boom")
    assert out.getvalue() == "\rx: 1/10 images 1.0 images/s ETA 0m09s\n"
