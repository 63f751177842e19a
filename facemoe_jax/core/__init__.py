"""The bottom layer: messages, progress, file paths, the pixel convention. Imports nothing else
of facemoe_jax."""
