"""The command lines' shared parsing: absl flags with --config.<field> overrides, and mistakes
reported as one line naming the flag, file or field (exit status 2), never a traceback."""

import sys

from absl import flags

from facemoe_jax.core import messages


def fail(message: str, status: int = 2):
    message = messages.one_line(message)
    if len(message) > 1000:  # e.g. TFDS lists every dataset it knows
        message = f"{message[:1000]} ... ({len(message) - 1000} more characters)"
    messages.error(message)
    sys.exit(status)


def config_file_error(argv: list[str], detail: str) -> str:
    """ml_collections wraps a config file's own exception in a traceback text: keep its last
    line (the exception) and name the file."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        path = argv[argv.index("--config") + 1]
    lines = [line.strip() for line in detail.strip().splitlines() if line.strip()]
    cause = lines[-1] if lines else detail
    where = next((line for line in reversed(lines) if line.startswith("File ")), "")
    if "Traceback" in detail:
        # ' '.join(...) below flattens newlines; keep the file/line of the failure.
        return f"--config={path}: get_config failed ({where}): {cause}"
    return f"--config={path}: {cause}"


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags and config overrides; a mistake ends in one line naming the flag."""
    try:
        return flags.FLAGS(argv)
    except SyntaxError as e:  # raised by the config file itself
        fail(f"--config={e.filename} line {e.lineno}: {e.msg}: {(e.text or '').strip()}")
    except flags.Error as e:
        if "Error whilst parsing config file" in str(e):
            fail(config_file_error(argv, str(e).split("Error whilst parsing config file:", 1)[1]))
        fail(str(e))
    except (KeyError, AttributeError) as e:  # ml_collections: an override names no field
        while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError(...))
            e = e.args[0]
        detail = str(e.args[0]) if e.args else ""
        missing = detail.split("\n")[0].strip("'\"")
        culprit = next((a for a in argv if a.startswith("--config.") and missing in a), None)
        fail(f"unknown config field in {culprit or 'a --config override'}: {detail}")
