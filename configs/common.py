"""The shared config builder, re-exported for config files (`from configs import common`).

The defaults live in the package (facemoe_jax/core/defaults.py), so installed code and these
files read one set.
"""

from facemoe_jax.core.defaults import get_base_config, low_resolution_eval

__all__ = ["get_base_config", "low_resolution_eval"]
