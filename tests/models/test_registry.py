"""The model registry: every name builds a tiny model, and every exportable one has a PyTorch
twin whose state_dict names and shapes are the ones the conversion rules give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, swin_moe_120
from facemoe_jax.models import MODELS, build_model, registry


def tiny_config(name, tmp_path):
    cfg = common.get_base_config().model
    cfg.update(name=name, image_size=16, embed_dim=8, drop_path_rate=0.0)
    if name == "vit_moe":
        cfg.update(patch_size=4, width=16, depth=2, num_heads=2, mlp_ratio=2.0, num_experts=3)
    elif name == "swin_moe":
        cfg = swin_moe_120.get_config().model
        cfg.update(image_size=12, patch_size=2, width=8, embed_dim=8)
        cfg.depths, cfg.stage_heads, cfg.window_size = (2, 2), (1, 2), 3
    elif name == "iresnet":
        cfg.depth = 18
    elif name == "mobilefacenet":
        cfg.mobilefacenet_blocks = (1, 1, 1, 1)
    elif name == "onnx":
        pytest.importorskip("onnxruntime")
        from tests.export.test_onnx_finetune import small_face_graph

        cfg.update(onnx_path=small_face_graph(tmp_path / "model.onnx"), embed_dim=16)
    return cfg


def abstract(model, size):
    x = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    embedding, _ = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    return variables, embedding


def test_the_names():
    assert list(MODELS) == ["vit_moe", "swin_moe", "iresnet", "mobilefacenet", "onnx"]
    with pytest.raises(ValueError, match=r"config.model.name='vit' is not a known model \(known: "):
        registry.spec("vit")


@pytest.mark.parametrize("name", list(MODELS))
def test_every_name_builds_a_tiny_model(name, tmp_path):
    cfg = tiny_config(name, tmp_path)
    spec = registry.spec(name)
    assert spec.name == name
    model = build_model(cfg)
    variables, embedding = abstract(model, cfg.image_size)
    assert embedding.shape == (1, cfg.embed_dim)
    modules = set(variables["params"]) | set(variables.get("batch_stats", {}))
    assert set(spec.head_names) <= modules  # every head rule names a real module
    assert set(spec.head_batchnorms) <= set(spec.head_names)


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if s.export == "twin"])
def test_every_exportable_name_has_its_twin_and_rules(name, tmp_path):
    pytest.importorskip("torch")
    from facemoe_jax.interop import convert, torch_models

    cfg = tiny_config(name, tmp_path)
    spec = registry.spec(name)
    twin = torch_models.torch_model_from_config(cfg)
    module, _, cls = spec.torch_class.rpartition(".")
    assert type(twin) is getattr(__import__(module, fromlist=[cls]), cls)
    shapes = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert shapes == convert.torch_state_dict_shapes(cfg)
    buffers = convert.geometry_buffers(cfg)
    counters = [f"{spec.head_names[bn]}.num_batches_tracked" for bn in spec.head_batchnorms]
    assert all(counter in buffers for counter in counters)
    assert any(".attn_mask" in k for k in buffers) == spec.window_buffers
    for name_ in spec.constant_ones:
        np.testing.assert_array_equal(convert.constant_entries(cfg)[name_], np.ones(8))
    if spec.official_constructor:
        assert spec.official_constructor.format_map(cfg).endswith(
            f"(num_experts={cfg.num_experts}, k={cfg.top_k})"
        )


def test_a_graph_model_has_no_twin(tmp_path):
    spec = registry.spec("onnx")
    assert spec.export == "graph" and spec.torch_class is None
    with pytest.raises(ValueError, match="config.model.name='onnx' has no PyTorch export"):
        spec.twin()
