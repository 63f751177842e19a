"""Moved to facemoe_jax/interop/convert.py; this name remains only until train/init_from.py and
train/distill.py load through interop/load.load_variables (then delete it)."""

from facemoe_jax.interop.convert import load_state_dict_file, torch_to_jax  # noqa: F401
