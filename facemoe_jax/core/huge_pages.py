"""Transparent huge pages for XLA:CPU's buffers: the command-line entry points restart once with
glibc's `glibc.malloc.hugetlb=1`.

XLA:CPU gets each execution's temporaries as one malloc'd block (384 MiB for the small Swin-MoE
train step), which glibc maps fresh with `mmap` and returns at the end of the step: in 4 KiB
pages that is ~100,000 page faults a step, and the step's matmuls walk those pages through the
TLB. With the tunable, glibc asks the kernel for 2 MiB pages (`madvise(MADV_HUGEPAGE)`) for the
memory it maps: the small Swin-MoE step alone on the development CPU went from 530-560 ms to
440-470 ms (benchmarks/RESULTS.md, fifth session). glibc reads tunables only when a process
starts, hence the restart: `os.execve` of the same command line with the variable added, before
JAX starts its backend (same process id, so signals and launchers are unaffected).

Nothing happens where it cannot help: not Linux or not glibc >= 2.35 (the first with the
tunable), transparent huge pages `never`, the tunable already set (by the user, or by the restart
itself), or `FACEMOE_HUGE_PAGES=0`.
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "FACEMOE_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_OFF = ("0", "false", "no", "off")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None for another C library or platform."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if name == "glibc" and match else None


def thp_mode(path: str = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word: always, madvise, never)."""
    try:
        with open(path) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def declined(environ) -> bool:
    """Whether the user turned the restart off (`FACEMOE_HUGE_PAGES=0`, `off`, `no`, `false`)."""
    return environ.get(OPT_OUT, "1").strip().lower() in _OFF


def environment_with_huge_pages(environ, glibc, thp) -> dict | None:
    """The environment to restart with, or None to carry on as is."""
    if declined(environ):
        return None
    if glibc is None or glibc < (2, 35) or thp not in ("always", "madvise"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if f"{TUNABLE}=" in tunables:
        return None  # the user's own choice, or this process is the restart
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return env


def huge_pages_on(environ=os.environ) -> bool:
    return f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", "").split(":")


def summary(environ=os.environ) -> str:
    """One phrase for the compile line: whether this process got the huge pages, and why not."""
    if huge_pages_on(environ):
        return "host buffers in huge pages"
    if declined(environ):
        return f"host buffers in 4 KiB pages ({OPT_OUT}=0)"
    return "host buffers in 4 KiB pages"


def restart_with_huge_pages() -> None:
    """Re-executes this command line with huge pages, where that applies; else returns.

    Call it first thing in a command-line entry point (it never returns when it restarts)."""
    if not sys.platform.startswith("linux") or len(getattr(sys, "orig_argv", ())) < 2:
        return
    env = environment_with_huge_pages(os.environ, glibc_version(), thp_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # cannot restart (an unusual interpreter setup): go on without huge pages
