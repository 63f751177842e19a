"""facemoe_jax: Mixture-of-Experts face recognition for low-resolution faces, in JAX/Flax."""

__version__ = "0.1.0"
