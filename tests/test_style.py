"""The tree passes the linter and is formatted as the formatter would write it.

Pinned in requirements.txt (rule sets and layout change between ruff releases); the settings are
pyproject.toml's [tool.ruff]. Fix with `ruff check --fix .` and `ruff format .`.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff(command):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout}{done.stderr}"
