"""Test-wide settings: keep TensorFlow off accelerators and JAX deterministic on CPU."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")



def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs taking more than ~20 s")
