"""Config files named in a config (a teacher's, a pretraining run's): "path.py[:arg]"."""

import importlib.util
import os
import sys

# Config files import their shared builder as `configs.common` from the project root.
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config_file(spec: str):
    """A config file "path.py[:arg]" -> its get_config(arg); a relative path may also be
    relative to the project root."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(_PROJECT_ROOT, path)):
        path = os.path.join(_PROJECT_ROOT, path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {spec!r}: {path!r} is not a file")
    if _PROJECT_ROOT not in sys.path:
        sys.path.insert(0, _PROJECT_ROOT)
    module_spec = importlib.util.spec_from_file_location("facemoe_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
