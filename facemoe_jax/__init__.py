"""facemoe_jax: Mixture-of-Experts face recognition for low-resolution faces, in JAX/Flax."""

__version__ = "0.3.0"  # pyproject.toml reads it; CHANGELOG.md says what changed


def __getattr__(name):
    # FaceEncoder is imported on first use, so `import facemoe_jax` stays light (no JAX/Flax).
    if name == "FaceEncoder":
        from facemoe_jax.encoder import FaceEncoder

        return FaceEncoder
    raise AttributeError(f"module 'facemoe_jax' has no attribute {name!r}")
