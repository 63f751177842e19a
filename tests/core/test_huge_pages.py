"""The entry points' restart with glibc's huge-page tunable: when it applies, and that it restarts
exactly once with the user's other tunables kept."""

import os
import subprocess
import sys

from facemoe_jax.core import huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUNABLE = "glibc.malloc.hugetlb=1"


def test_restarts_with_the_tunable_where_it_can_help():
    env = huge_pages.environment_with_huge_pages({"PATH": "/bin"}, (2, 36), "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    env = huge_pages.environment_with_huge_pages({}, (2, 35), "always")
    assert env["GLIBC_TUNABLES"] == TUNABLE


def test_keeps_the_users_other_tunables():
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    env = huge_pages.environment_with_huge_pages(environ, (2, 36), "madvise")
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert environ == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}  # not modified


def test_no_restart_where_it_cannot_help_or_is_declined():
    assert huge_pages.environment_with_huge_pages({}, (2, 34), "madvise") is None  # no tunable
    assert huge_pages.environment_with_huge_pages({}, None, "madvise") is None  # not glibc
    assert huge_pages.environment_with_huge_pages({}, (2, 36), "never") is None
    assert huge_pages.environment_with_huge_pages({}, (2, 36), None) is None  # no THP at all
    for value in ("0", "off", "False", " no "):
        environ = {huge_pages.OPT_OUT: value}
        assert huge_pages.environment_with_huge_pages(environ, (2, 36), "madvise") is None
    # The user's own setting, whatever it is, and the restarted process itself.
    for tunables in ("glibc.malloc.hugetlb=0", TUNABLE, f"glibc.malloc.arena_max=1:{TUNABLE}"):
        environ = {"GLIBC_TUNABLES": tunables}
        assert huge_pages.environment_with_huge_pages(environ, (2, 36), "madvise") is None


def test_reads_the_kernels_mode_and_the_libc_version(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(str(setting)) == "madvise"
    setting.write_text("[always] madvise never\n")
    assert huge_pages.thp_mode(str(setting)) == "always"
    assert huge_pages.thp_mode(str(tmp_path / "missing")) is None
    version = huge_pages.glibc_version()
    assert version is None or (len(version) == 2 and all(isinstance(v, int) for v in version))


def test_on_and_summary():
    assert huge_pages.huge_pages_on({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:{TUNABLE}"})
    assert not huge_pages.huge_pages_on({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not huge_pages.huge_pages_on({})
    assert huge_pages.summary({"GLIBC_TUNABLES": TUNABLE}) == "host buffers in huge pages"
    assert "FACEMOE_HUGE_PAGES=0" in huge_pages.summary({huge_pages.OPT_OUT: "0"})


CHILD = (
    "import os, sys; from facemoe_jax.core import huge_pages; "
    "print('start', flush=True); huge_pages.restart_with_huge_pages(); "
    "print('tunables', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
)


def run_child(**env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT)}
    env.update(env_changes)
    return subprocess.run(
        [sys.executable, "-c", CHILD, "--config", "x y"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_restart_happens_once_with_the_same_arguments():
    """On this machine: restarted exactly when the decision says so (glibc and the kernel's
    setting vary between machines), once, with the command line unchanged."""
    proc = run_child(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert proc.returncode == 0, proc.stderr
    environ = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    environ.pop(huge_pages.OPT_OUT, None)
    expected = huge_pages.environment_with_huge_pages(
        environ, huge_pages.glibc_version(), huge_pages.thp_mode()
    )
    restarted = expected is not None and sys.platform.startswith("linux")
    tunables = expected["GLIBC_TUNABLES"] if restarted else "glibc.malloc.arena_max=4"
    lines = proc.stdout.splitlines()
    assert lines == ["start"] * (2 if restarted else 1) + [
        f"tunables {tunables} ['--config', 'x y']"
    ]


def test_declined_restart_leaves_the_process_alone():
    proc = run_child(FACEMOE_HUGE_PAGES="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["start", "tunables None ['--config', 'x y']"]
