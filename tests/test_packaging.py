"""Packaging facts that must stay true: one version, pins inside the declared ranges, no local
version labels (they exist only on the PyTorch index), the console command."""

import os
import re
import tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement

import facemoe_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def pinned_requirements() -> list[Requirement]:
    lines = open(os.path.join(ROOT, "requirements.txt")).read().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def test_one_version_written_once_and_in_the_changelog():
    project = pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "facemoe_jax.__version__"
    }
    changelog = open(os.path.join(ROOT, "CHANGELOG.md")).read()
    first = re.search(r"^## \[?(\d+\.\d+\.\d+)", changelog, re.M)
    assert first and first.group(1) == facemoe_jax.__version__


def test_requirements_are_exact_public_pins_inside_the_pyproject_ranges():
    pins = pinned_requirements()
    for req in pins:
        (spec,) = req.specifier
        assert spec.operator == "==" and "+" not in spec.version, str(req)
    # Per platform: the x86-64 pins and the arm64 pins (tensorflow-cpu has no arm64 wheels).
    for machine in ("x86_64", "aarch64", "arm64"):
        env = dict(default_environment(), platform_machine=machine)
        pinned = {
            req.name.lower().replace("_", "-"): next(iter(req.specifier)).version
            for req in pins
            if req.marker is None or req.marker.evaluate(env)
        }
        project = pyproject()["project"]
        declared = project["dependencies"] + [
            d for extra in ("export", "test") for d in project["optional-dependencies"][extra]
        ]
        for line in declared:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = req.name.lower().replace("_", "-")
            assert name in pinned, f"{name} is declared in pyproject.toml but not pinned"
            assert req.specifier.contains(pinned[name]), (machine, line, pinned[name])


def test_console_command_is_the_module_entry_point():
    scripts = pyproject()["project"]["scripts"]
    assert scripts == {"facemoe": "facemoe_jax.main:_run_cli"}
    from facemoe_jax import main

    assert callable(main._run_cli)
