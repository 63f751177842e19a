"""Runs the tests' *_check.py scripts: each needs fake CPU devices set before JAX starts, so it
runs in its own Python process and reports on its last line of stdout."""

import json
import os
import subprocess
import sys


def run_check_script(test_file: str, script: str, timeout: int = 600):
    """Runs `script` (beside `test_file`); asserts it succeeded; returns the CompletedProcess."""
    path = os.path.join(os.path.dirname(test_file), script)
    done = subprocess.run(
        [sys.executable, path], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def last_line(done) -> str:
    return done.stdout.strip().splitlines()[-1]


def json_report(done) -> dict:
    """The JSON object a check script prints as its last line."""
    return json.loads(last_line(done))
