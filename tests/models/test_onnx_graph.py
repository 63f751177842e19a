"""ONNX graphs as Flax modules (models/onnx_graph.py), checked against onnxruntime.

Each small graph is written with onnx.helper, run by onnxruntime on the normalised images, and
by our module on the same uint8 images; real models (the shared LFW recognizer, an IResNet-50
exported from our PyTorch twin) are in tests/test_encoder_onnx.py.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from facemoe_jax.models import onnx_graph  # noqa: E402

RNG = np.random.default_rng(0)


def _weight(name, *shape, scale=0.3):
    return numpy_helper.from_array(RNG.normal(0, scale, shape).astype(np.float32), name)


def write_graph(path, nodes, initializers, size=8, batch="N", out_dim=None, opset=13):
    """A graph taking `x` (batch, 3, size, size) and giving `y`."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_dim])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def images(n=3, size=8, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def ours(path, x, mean=-1.0, std=-1.0, train=False):
    graph = onnx_graph.read_graph(path)
    mean, std = onnx_graph.input_normalization(graph, mean, std)
    model = onnx_graph.OnnxModel(graph, input_mean=mean, input_std=std)
    variables = onnx_graph.onnx_variables(graph)
    normalised = (jnp.asarray(x, jnp.float32) / 255.0 - 0.5) / 0.5
    if train:
        return model.apply(variables, normalised, train=True, mutable=["batch_stats"])
    return np.asarray(model.apply(variables, normalised)[0])


def reference(path, x, mean=127.5, std=127.5, one_at_a_time=False):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = ((x.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2)
    if one_at_a_time:
        out = [session.run(None, {"x": feed[i : i + 1]})[0] for i in range(len(feed))]
        return np.concatenate(out).reshape(len(x), -1)
    return session.run(None, {"x": feed})[0].reshape(len(x), -1)


def test_conv_batchnorm_prelu_and_pools(tmp_path):
    # Grouped, strided, dilated, asymmetrically padded conv; depthwise with a channel
    # multiplier; BatchNorm; per-channel PRelu through Unsqueeze (as PyTorch exports it).
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w1", "b1"],
            ["c1"],
            group=3,
            strides=[2, 1],
            pads=[1, 0, 2, 1],
            dilations=[1, 2],
            kernel_shape=[3, 3],
        ),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"], epsilon=1e-3),
        helper.make_node("Unsqueeze", ["slope", "axes"], ["slope3"]),
        helper.make_node("PRelu", ["n1", "slope3"], ["p1"]),
        helper.make_node("Conv", ["p1", "wd"], ["d1"], group=6, pads=[1, 1, 1, 1]),
        helper.make_node(
            "MaxPool",
            ["d1"],
            ["mp"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            ceil_mode=1,
        ),
        helper.make_node(
            "AveragePool",
            ["d1"],
            ["ap"],
            kernel_shape=[2, 3],
            strides=[2, 2],
            pads=[0, 1, 1, 1],
            count_include_pad=1,
        ),
        helper.make_node(
            "AveragePool", ["d1"], ["ap2"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 0, 0]
        ),
        helper.make_node("GlobalAveragePool", ["d1"], ["gp"]),
        helper.make_node("Flatten", ["mp"], ["f1"]),
        helper.make_node("Flatten", ["ap"], ["f2"]),
        helper.make_node("Flatten", ["ap2"], ["f3"]),
        helper.make_node("Flatten", ["gp"], ["f4"]),
        helper.make_node("Concat", ["f1", "f2", "f3", "f4"], ["y"], axis=1),
    ]
    stats = [
        numpy_helper.from_array(RNG.normal(0, 0.2, 6).astype(np.float32), "m"),
        numpy_helper.from_array(RNG.uniform(0.5, 2, 6).astype(np.float32), "v"),
    ]
    inits = [
        _weight("w1", 6, 1, 3, 3),
        _weight("b1", 6),
        _weight("g", 6),
        _weight("b", 6),
        _weight("slope", 6),
        _weight("wd", 12, 1, 3, 3),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
    ] + stats
    path = write_graph(tmp_path / "g.onnx", nodes, inits, size=9)
    x = images(size=9)
    np.testing.assert_allclose(ours(path, x), reference(path, x), rtol=1e-4, atol=1e-4)
    graph = onnx_graph.read_graph(path)
    assert set(graph.params) == {"w1", "b1", "g", "b", "slope", "wd"}
    assert set(graph.statistics) == {"m", "v"} and set(graph.constants) == {"axes"}


def test_pointwise_convolutions_match_onnxruntime(tmp_path):
    # 1x1 convs take the matrix-product path (with and without bias); a strided or padded 1x1
    # does not, and must still match.
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"]),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], strides=[2, 2]),
        helper.make_node("Conv", ["c2", "w3"], ["c4"], pads=[1, 0, 0, 1]),
        helper.make_node("Flatten", ["c3"], ["f3"]),
        helper.make_node("Flatten", ["c4"], ["f4"]),
        helper.make_node("Concat", ["f3", "f4"], ["y"], axis=1),
    ]
    inits = [_weight("w1", 8, 3, 1, 1), _weight("b1", 8), _weight("w2", 5, 8, 1, 1)]
    inits.append(_weight("w3", 4, 5, 1, 1))
    path = write_graph(tmp_path / "g.onnx", nodes, inits, size=7)
    x = images(size=7)
    np.testing.assert_allclose(ours(path, x), reference(path, x), rtol=1e-5, atol=1e-5)


def test_wide_3x3_convolutions_by_winograd_match_onnxruntime(tmp_path):
    """A 3x3 stride-1 padding-1 conv with 128 input channels on an 8x8 map takes kernels/winograd.py in
    evaluation (a strided one does not); both match onnxruntime and the direct convolution."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[0, 0, 0, 0], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Flatten", ["c3"], ["y"]),
    ]
    inits = [_weight("w1", 128, 3, 1, 1), _weight("w2", 16, 128, 3, 3, scale=0.05)]
    inits += [_weight("b2", 16), _weight("w3", 4, 16, 3, 3)]
    path = write_graph(tmp_path / "g.onnx", nodes, inits, size=8)
    x = images(size=8)
    graph = onnx_graph.read_graph(path)
    mean, std = onnx_graph.input_normalization(graph, -1.0, -1.0)
    variables = onnx_graph.onnx_variables(graph)
    normalised = (jnp.asarray(x, jnp.float32) / 255.0 - 0.5) / 0.5
    out = {
        algorithm: np.asarray(
            onnx_graph.OnnxModel(graph, mean, std, conv_algorithm=algorithm).apply(
                variables, normalised
            )[0]
        )
        for algorithm in ("winograd", "direct")
    }
    scale = np.abs(out["direct"]).max()
    np.testing.assert_allclose(out["winograd"], reference(path, x), rtol=0, atol=1e-5 * scale)
    assert 0 < np.abs(out["winograd"] - out["direct"]).max() < 1e-5 * scale


def _adapter_graph(tmp_path, initializers=None):
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("PRelu", ["c1", "slope"], ["p1"]),
        helper.make_node("Conv", ["p1", "wd"], ["d1"], group=6, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d1", "w2"], ["c2"], strides=[2, 2]),  # strided: not adapted
        helper.make_node("Conv", ["c2", "w3"], ["c3"]),
        helper.make_node("Flatten", ["c3"], ["y"]),
    ]
    inits = initializers or {
        "w1": _weight("w1", 6, 3, 1, 1),
        "b1": _weight("b1", 6),
        "slope": _weight("slope", 6, 1, 1),
        "wd": _weight("wd", 6, 1, 3, 3),
        "w2": _weight("w2", 5, 6, 1, 1),
        "w3": _weight("w3", 4, 5, 1, 1),
    }
    return write_graph(tmp_path / "g.onnx", nodes, list(inits.values()), size=6), inits


def test_lora_on_pointwise_convolutions_merges_into_an_equal_graph(tmp_path):
    from facemoe_jax.models.lora import LoRASettings

    path, inits = _adapter_graph(tmp_path)
    graph = onnx_graph.read_graph(path)
    assert set(onnx_graph.adapted_nodes(graph)) == {"w1", "w3"}
    lora = LoRASettings(rank=2, scale=0.7, dropout=0.0, init="zero_up", quality_mix=False)
    model = onnx_graph.OnnxModel(graph, 127.5, 127.5, lora=lora)
    x = (jnp.asarray(images(size=6), jnp.float32) / 255.0 - 0.5) / 0.5
    variables = model.init(jax.random.key(0), x)
    plain = onnx_graph.OnnxModel(graph, 127.5, 127.5)
    base = np.asarray(plain.apply(onnx_graph.onnx_variables(graph), x)[0])
    # B = 0 at the start: the adapted model is the graph.
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)[0]), base, atol=1e-6)
    params = dict(variables["params"])
    for name in params:
        if "_lora_up" in name:
            params[name] = RNG.normal(0, 0.3, params[name].shape).astype(np.float32)
    adapted = np.asarray(model.apply({"params": params}, x)[0])
    assert np.abs(adapted - base).max() > 1e-2
    # Merged into the weights, the graph itself (run by onnxruntime) gives the same output.
    merged = onnx_graph.onnx_state_dict(graph, {"params": params, "batch_stats": {}}, lora)
    new = {
        k: numpy_helper.from_array(merged.get(k, numpy_helper.to_array(v)), k)
        for k, v in inits.items()
    }
    merged_path, _ = _adapter_graph(tmp_path, new)
    x_uint8 = images(size=6)
    np.testing.assert_allclose(reference(merged_path, x_uint8, 127.5, 127.5), adapted, atol=1e-4)
    mixed = LoRASettings(rank=2, dropout=0.0, init="zero_up", quality_mix=True)
    with pytest.raises(ValueError, match="quality-mixed"):
        onnx_graph.onnx_state_dict(graph, {"params": params, "batch_stats": {}}, mixed)


def test_lora_where_is_checked_per_model(tmp_path):
    from configs import common
    from facemoe_jax.models import build_model

    path, _ = _adapter_graph(tmp_path)
    config = common.get_base_config()
    config.model.update(name="onnx", onnx_path=path, image_size=6, embed_dim=4 * 3 * 3)
    config.model.lora.update(rank=2, where="qkv", quality_mix=False)
    with pytest.raises(ValueError, match="config.model.lora.where"):
        build_model(config.model)
    config.model.lora.where = "pointwise"
    assert build_model(config.model).lora.rank == 2
    vit = common.get_base_config()
    vit.model.lora.update(rank=2, where="pointwise")
    with pytest.raises(ValueError, match="config.model.lora.where"):
        build_model(vit.model)


def test_elementwise_activations_and_matmuls(tmp_path):
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),  # (N, 3)
        helper.make_node("Gemm", ["f", "wg", "bg"], ["h"], transB=1, alpha=0.7, beta=1.3),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Sigmoid", ["h"], ["s"]),
        helper.make_node("Clip", ["h", "lo", "hi"], ["c"]),
        helper.make_node("Add", ["r", "bias"], ["a"]),
        helper.make_node("Sub", ["a", "s"], ["b"]),
        helper.make_node("Mul", ["b", "c"], ["m"]),
        helper.make_node("Div", ["m", "two"], ["d"]),
        helper.make_node("MatMul", ["d", "wm"], ["mm"]),
        helper.make_node("Transpose", ["mm"], ["t"], perm=[1, 0]),
        helper.make_node("Transpose", ["t"], ["t2"]),
        helper.make_node("ReduceMean", ["t2"], ["rm"], axes=[1], keepdims=1),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(2.0))),
        helper.make_node("Mul", ["rm", "k"], ["rk"]),
        helper.make_node("Identity", ["t2"], ["i"]),
        helper.make_node("Dropout", ["i"], ["dr"]),
        helper.make_node("Concat", ["dr", "rk"], ["y"], axis=1),
    ]
    scalar = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    inits = [
        _weight("wg", 5, 3),
        _weight("bg", 5),
        scalar("lo", -0.2),
        scalar("hi", 0.3),
        _weight("bias", 5),
        scalar("two", 2.0),
        _weight("wm", 5, 4),
    ]
    path = write_graph(tmp_path / "g.onnx", nodes, inits)
    x = images()
    np.testing.assert_allclose(ours(path, x), reference(path, x), rtol=1e-5, atol=1e-5)
    graph = onnx_graph.read_graph(path)
    # Learnt: weights and the non-scalar bias; constants: the scalars and the Constant node.
    assert set(graph.params) == {"wg", "bg", "bias", "wm"}
    assert {"lo", "hi", "two"} <= set(graph.constants)


def test_fixed_batch_graph_runs_at_any_batch(tmp_path):
    # An export traced at batch 1 with its flatten written as Reshape to [1, -1], and a
    # PyTorch-style dynamic flatten (Shape -> Gather -> Unsqueeze -> Concat -> Reshape).
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Shape", ["c"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape2"], axis=0),
        helper.make_node("Reshape", ["c", "shape2"], ["r2"]),
        helper.make_node("Add", ["r", "r2"], ["y"]),
    ]
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [
        _weight("w", 4, 3, 3, 3),
        ints("shape", [1, -1]),
        ints("zero", 0),
        ints("axes0", [0]),
        ints("minus1", [-1]),
    ]
    path = write_graph(tmp_path / "g.onnx", nodes, inits, batch=1)
    x = images(n=5)
    assert onnx_graph.read_graph(path).fixed_batch == 1
    np.testing.assert_allclose(
        ours(path, x), reference(path, x, one_at_a_time=True), rtol=1e-5, atol=1e-5
    )


def test_preprocessing_inside_the_graph_is_honoured(tmp_path):
    # insightface's graphs start with Sub 127.5 and Mul 1/127.5 on raw pixels: the default
    # input normalisation then feeds raw pixels (mean 0, std 1).
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"]),
        helper.make_node("Mul", ["a", "scale"], ["b"]),
        helper.make_node("Conv", ["b", "w"], ["c"]),
        helper.make_node("Flatten", ["c"], ["y"]),
    ]
    scalar = lambda name, v: numpy_helper.from_array(np.array([v], np.float32), name)  # noqa: E731
    inits = [scalar("mean", 127.5), scalar("scale", 1 / 127.5), _weight("w", 2, 3, 3, 3)]
    path = write_graph(tmp_path / "g.onnx", nodes, inits)
    graph = onnx_graph.read_graph(path)
    assert graph.normalizes_inside and onnx_graph.input_normalization(graph) == (0.0, 1.0)
    assert {"mean", "scale"} <= set(graph.constants)  # not trainable
    x = images()
    np.testing.assert_allclose(
        ours(path, x), reference(path, x, mean=0.0, std=1.0), rtol=1e-4, atol=1e-4
    )


def test_batchnorm_in_training_updates_statistics_with_the_node_momentum(tmp_path):
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], momentum=0.8),
        helper.make_node("Flatten", ["n"], ["y"]),
    ]
    zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
    inits = [
        numpy_helper.from_array(a, k)
        for a, k in ((ones, "g"), (zeros, "b"), (zeros, "m"), (ones, "v"))
    ]
    path = write_graph(tmp_path / "g.onnx", nodes, inits, size=4)
    x = images(n=4, size=4)
    (out, _), mutated = ours(path, x, train=True)
    pixels = ((x.astype(np.float32) / 255 - 0.5) / 0.5 * 0.5 + 0.5) * 255
    nchw = ((pixels - 127.5) / 127.5).transpose(0, 3, 1, 2)
    mean, var = nchw.mean(axis=(0, 2, 3)), nchw.var(axis=(0, 2, 3))
    stats = mutated["batch_stats"]
    np.testing.assert_allclose(stats["m"], 0.2 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["v"], 0.8 + 0.2 * var, rtol=1e-4, atol=1e-6)
    expected = (nchw - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    np.testing.assert_allclose(np.asarray(out), expected.reshape(4, -1), rtol=1e-3, atol=1e-3)


def test_gradients_reach_the_initializers(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"]),
        helper.make_node("Flatten", ["c"], ["y"]),
    ]
    path = write_graph(tmp_path / "g.onnx", nodes, [_weight("w", 2, 3, 3, 3), _weight("b", 2)])
    graph = onnx_graph.read_graph(path)
    model = onnx_graph.OnnxModel(graph)
    variables = onnx_graph.onnx_variables(graph)
    x = (jnp.asarray(images(), jnp.float32) / 255 - 0.5) / 0.5
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)[0] ** 2))(variables["params"])
    assert set(grads) == {"w", "b"} and all(float(jnp.abs(g).sum()) > 0 for g in grads.values())
    state = onnx_graph.onnx_state_dict(graph, variables)
    assert set(state) == {"w", "b"} and state["w"].dtype == np.float32


def test_unsupported_operator_names_it_and_the_node(tmp_path):
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"]),
        helper.make_node("NonZero", ["g"], ["nz"], name="where_experts"),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    path = write_graph(tmp_path / "g.onnx", nodes, [])
    with pytest.raises(onnx_graph.OnnxImportError, match=r"'NonZero' \(node 'where_experts', #1\)"):
        onnx_graph.read_graph(path)


def test_truncated_and_missing_files(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Flatten", ["c"], ["y"])]
    path = write_graph(tmp_path / "g.onnx", nodes, [_weight("w", 2, 3, 3, 3)])
    data = open(path, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(onnx_graph.OnnxImportError, match="cut.onnx: not a readable ONNX model"):
        onnx_graph.read_graph(str(cut))
    with pytest.raises(onnx_graph.OnnxImportError, match="no such ONNX file"):
        onnx_graph.read_graph(str(tmp_path / "absent.onnx"))


def test_flax_names_are_unique_identifiers():
    names = onnx_graph._flax_names(("a.b", "a_b", "onnx::Conv_5", "a/b"))
    assert names == {"a.b": "a_b", "a_b": "a_b_1", "onnx::Conv_5": "onnx__Conv_5", "a/b": "a_b_2"}


def test_other_activations_and_shape_operators(tmp_path):
    # Tanh, LeakyRelu, Softmax, Cast and Squeeze, beyond the recognizers' core set.
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"]),  # (N, 3, 1, 1)
        helper.make_node("Squeeze", ["g", "axes"], ["s"]),  # (N, 3)
        helper.make_node("Tanh", ["s"], ["t"]),
        helper.make_node("LeakyRelu", ["s"], ["l"], alpha=0.2),
        helper.make_node("Softmax", ["s"], ["m"], axis=1),
        helper.make_node("Cast", ["m"], ["c64"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["c64"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["t", "l", "c"], ["y"], axis=1),
    ]
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    path = write_graph(tmp_path / "g.onnx", nodes, inits)
    x = images()
    np.testing.assert_allclose(ours(path, x), reference(path, x), rtol=1e-5, atol=1e-6)


# ---- the recognizability quality head on a graph


def _quality_graph(tmp_path, first=("Sub", "Mul")):
    """insightface-like: affine preprocessing inside the graph (or `first` other nodes on the
    image), then a strided padded 3x3 conv, PRelu, a 1x1 conv, pooling: 16 px -> 4-d."""
    scalar = lambda name, v: numpy_helper.from_array(np.array([v], np.float32), name)  # noqa: E731
    nodes, inits, source = [], [], "x"
    for k, op in enumerate(first):
        operand = {"Sub": ("mean", 127.5), "Mul": ("scale", 1 / 127.5)}.get(op)
        inputs = [source] if operand is None else [source, operand[0]]
        nodes.append(helper.make_node(op, inputs, [f"pre{k}"]))
        if operand is not None:
            inits.append(scalar(*operand))
        source = f"pre{k}"
    nodes += [
        helper.make_node("Conv", [source, "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c1", "slope"], ["p1"]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    inits += [_weight("w1", 6, 3, 3, 3), _weight("b1", 6), _weight("slope", 6, 1, 1)]
    inits.append(_weight("w2", 4, 6, 1, 1))
    return write_graph(tmp_path / "q.onnx", nodes, inits, size=16, out_dim=4)


def _onnx_config(path, **model):
    from configs import common

    config = common.get_base_config()
    config.model.update(name="onnx", onnx_path=path, image_size=16, embed_dim=4, **model)
    return config


@pytest.mark.parametrize("head_input", ["embedding", "patch", "multiscale+embedding+norm"])
def test_a_quality_head_keeps_the_embedding_and_reads_the_first_convolution(tmp_path, head_input):
    from facemoe_jax.models import build_model
    from facemoe_jax.models import recognizability as heads

    path = _quality_graph(tmp_path)
    plain = build_model(_onnx_config(path).model)
    model = build_model(_onnx_config(path, quality_head=True, quality_head_input=head_input).model)
    assert [n.op for n in onnx_graph.stem_nodes(model.graph)] == ["Sub", "Mul", "Conv"]
    x = (jnp.asarray(images(n=4, size=16), jnp.float32) / 255.0 - 0.5) / 0.5
    variables = model.init(jax.random.key(0), x)
    # The graph's parameters are the file's; the head's are new, under "quality_head".
    graph_params = onnx_graph.onnx_variables(model.graph)["params"]
    assert set(variables["params"]) == set(graph_params) | {heads.QUALITY_NAME}
    (embeddings, _), sown = model.apply(variables, x, mutable=["intermediates"])
    np.testing.assert_array_equal(
        np.asarray(embeddings), np.asarray(plain.apply({"params": graph_params}, x)[0])
    )
    quality = np.asarray(sown["intermediates"][heads.QUALITY_KEY][0])
    assert quality.shape == (4,) and np.all((quality > 0) & (quality < 1))
    np.testing.assert_array_equal(
        quality, np.asarray(heads.head_quality(model, variables, x, False))
    )
    if head_input == "embedding":
        assert heads.PATCH_KEY not in sown["intermediates"]
        return

    # The first convolution, by hand: the graph's (x - 127.5) / 127.5 on raw pixels.
    def first_conv(images):
        pixels = (images * 0.5 + 0.5) * 255.0
        normalised = jnp.transpose((pixels - 127.5) / 127.5, (0, 3, 1, 2))
        w = jnp.asarray(graph_params["w1"])
        out = jax.lax.conv_general_dilated(normalised, w, (2, 2), ((1, 1), (1, 1)))
        return jnp.transpose(out + graph_params["b1"][None, :, None, None], (0, 2, 3, 1))

    if head_input == "patch":
        expected = heads.pool_positions(first_conv(x).reshape(4, -1, 6))
    else:
        expected = heads.multiscale_statistics(first_conv, x)
    patch = sown["intermediates"][heads.PATCH_KEY][0]
    assert patch.shape == (4, 18 if head_input != "patch" else 12)
    np.testing.assert_allclose(np.asarray(patch), np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_what_a_graph_cannot_offer_its_heads_is_refused_by_name(tmp_path):
    from facemoe_jax.models import build_model

    path = _quality_graph(tmp_path, first=("Relu",))  # not affine: no detail statistics
    with pytest.raises(ValueError, match=r"quality_head_input='multiscale\+embedding\+norm'.*Relu"):
        build_model(_onnx_config(path, quality_head=True).model)
    with pytest.raises(ValueError, match="quality_head_input='patch'"):
        build_model(_onnx_config(path, quality_head=True, quality_head_input="patch").model)
    assert build_model(
        _onnx_config(path, quality_head=True, quality_head_input="embedding").model
    ).heads.quality_head
    with pytest.raises(ValueError, match="config.model.perceptibility_attention=True.*onnx"):
        build_model(_onnx_config(path, perceptibility_attention=True).model)
    graph = onnx_graph.read_graph(_quality_graph(tmp_path, first=()))
    assert [n.op for n in onnx_graph.stem_nodes(graph)] == ["Conv"]
