"""Model builders: turn `config.model` into a Flax module (the table is models/registry.py)."""

from facemoe_jax.models.registry import (
    DTYPES,
    MODELS,
    ModelSpec,
    build_iresnet,
    build_mobilefacenet,
    build_model,
    build_onnx,
    build_swin,
    build_vit,
    onnx_model_config,
    spec,
)

__all__ = [
    "DTYPES",
    "MODELS",
    "ModelSpec",
    "build_iresnet",
    "build_mobilefacenet",
    "build_model",
    "build_onnx",
    "build_swin",
    "build_vit",
    "onnx_model_config",
    "spec",
]
