"""Test-wide settings: keep TensorFlow off accelerators and JAX deterministic on CPU."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most test time is XLA:CPU compiling small programs, and most of that is LLVM optimising
# machine code the tests then run only a few times: level 0 halves it. The numbers a test checks
# do not depend on it (no fast-math either way). Subprocesses the tests start inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs taking more than ~20 s")
