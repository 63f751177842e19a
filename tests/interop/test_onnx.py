"""ONNX export: the file onnxruntime runs embeds like JAX, for any batch size.

Random JAX variables (tests/interop/test_convert.py) -> PyTorch state_dict -> model.onnx, then
onnxruntime on batches of other sizes than the traced one (2): 1, and 5. The MoE routing (top-k,
per-expert gathers, scatter-add) runs inside the ONNX graph, so a batch routes its own way.
"""

import jax
import numpy as np
import pytest
import torch

import facemoe_jax
from facemoe_jax.interop import convert, torch_models
from facemoe_jax.interop import onnx as onnx_export
from tests.interop.test_convert import images, random_variables, tiny_swin_config, tiny_vit_config

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_vit_config(),  # dropless, softmax over the top-k
        tiny_vit_config(router_combine="raw_logits", capacity_factor=1.0),  # tokens dropped
        tiny_swin_config(),  # shifted windows with the mask, patch merging, MoE in every block
    ],
    ids=["vit_dropless", "vit_capacity_raw", "swin"],
)
def test_onnx_embeddings_equal_jax_for_any_batch(cfg, tmp_path):
    model, variables = random_variables(cfg)
    state = convert.jax_to_torch(cfg, variables)
    path = str(tmp_path / "model.onnx")
    info = onnx_export.export_onnx(cfg, state, path)
    assert info["input"]["shape"] == ["batch", 3, cfg.image_size, cfg.image_size]

    apply = jax.jit(model.apply)
    for n in (1, 5):
        x = images(cfg, n=n, seed=n)  # NHWC in [-1, 1], as the JAX model takes it
        expected, _ = apply(variables, x)
        got = onnx_export.run_onnx(path, x.transpose(0, 3, 1, 2))
        assert got.shape == (n, cfg.embed_dim) and got.dtype == np.float32
        diff = float(np.abs(got - np.asarray(expected)).max())
        print(f"max abs diff onnxruntime vs JAX ({cfg.name}, batch {n}): {diff:.2e}")
        assert diff <= 1e-4, diff

    meta = onnx_export.read_metadata(path)
    assert meta["facemoe_jax_version"] == facemoe_jax.__version__
    assert meta["normalization"] == "(x / 255 - 0.5) / 0.5"
    assert meta["model"]["name"] == cfg.name


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_an_expert_that_gets_no_tokens_is_still_in_the_graph(tmp_path):
    """Top-1 of 3 experts with gate rows (-v, v, 0): expert 2 never wins while tracing, nor
    on these inputs; expert 0 then wins for inputs with v.x < 0, so both routes must exist."""
    torch.manual_seed(0)
    moe = torch_models.MoEMlp(4, 8, 3, 1, "softmax_topk", None, torch.nn.ReLU()).eval()
    v = torch.randn(4)
    with torch.no_grad():
        moe.router.gate.weight.copy_(torch.stack([-v, v, torch.zeros(4)]))
    path = str(tmp_path / "moe.onnx")
    trace = (v / v.norm()).expand(1, 6, 4).contiguous()  # every token to expert 1
    with torch.no_grad():
        torch.onnx.export(
            moe, (trace,), path, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "b", 1: "n"}, "y": {0: "b", 1: "n"}}, opset_version=onnx_export.OPSET,
            dynamo=False,
        )  # fmt: skip
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 7, 4)  # another batch and token count than the trace's
    chosen = set(moe.router.gate(x).argmax(-1).flatten().tolist())
    assert chosen == {0, 1}
    with torch.no_grad():
        expected = moe(x).numpy()
    got = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)
