"""BatchNorms inserted into an ONNX graph (config.model.onnx_batchnorm), their calibration
(train/calibrate_bn.py) and their test-time adaptation (train/adapt_bn.py).

The reference is independent of our module: onnxruntime runs the graph and gives its first
convolution's output, and numpy computes the rest of the graph, the statistics and AdaBN's
alignment (x - mu_t) / sqrt(var_t + eps) * sqrt(var_hr + eps) + mu_hr.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cv2  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from facemoe_jax.core import defaults  # noqa: E402
from facemoe_jax.evaluate.lfw import degrade  # noqa: E402
from facemoe_jax.models import build_model, onnx_graph  # noqa: E402
from facemoe_jax.train import adapt_bn, calibrate_bn  # noqa: E402
from tests.evaluate.test_lfw import make_fake_lfw  # noqa: E402
from tests.models.test_onnx_graph import write_graph  # noqa: E402

EPS = onnx_graph.BATCHNORM_EPSILON
SIZE = 16
RNG = np.random.default_rng(3)
W = {
    "w1": RNG.normal(0, 0.2, (8, 3, 2, 2)),
    "b1": RNG.normal(0, 0.5, (8,)),
    "slope": RNG.uniform(0.1, 0.4, (8, 1, 1)),
    "w2": RNG.normal(0, 0.3, (6, 8, 1, 1)),
    # The graph's own (unfolded) BatchNormalization after the second convolution.
    "s": RNG.uniform(0.5, 1.5, (6,)),
    "b": RNG.normal(0, 0.2, (6,)),
    "m": RNG.normal(0, 0.3, (6,)),
    "v": RNG.uniform(0.5, 2.0, (6,)),
    "wg": RNG.normal(0, 0.3, (5, 6)),
}
W = {k: v.astype(np.float32) for k, v in W.items()}


@pytest.fixture(scope="module")
def graph_path(tmp_path_factory):
    """Conv (2x2 stride 2, bias) -> PRelu -> Conv 1x1 -> BatchNormalization -> mean pool ->
    Gemm; a second file also outputs the first convolution's output c1."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("PRelu", ["c1", "slope"], ["p1"]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"]),
        helper.make_node("BatchNormalization", ["c2", "s", "b", "m", "v"], ["n2"], epsilon=1e-3),
        helper.make_node("GlobalAveragePool", ["n2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1),
    ]
    weights = [numpy_helper.from_array(v, k) for k, v in W.items()]
    path = write_graph(tmp_path_factory.mktemp("g") / "g.onnx", nodes, weights, SIZE, out_dim=5)
    model = onnx.load(path)
    model.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    probe = path.replace(".onnx", "_c1.onnx")
    onnx.save(model, probe)
    return path, probe


def first_conv(probe, images):
    """onnxruntime's c1 (N, 8, H, W) float64 for uint8 images, insightface's normalisation."""
    session = ort.InferenceSession(probe, providers=["CPUExecutionProvider"])
    x = ((images.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    return session.run(["c1"], {"x": x})[0].astype(np.float64)


def stats(x):
    return x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))


def align(x, target, hr):
    """AdaBN's alignment of x (N, C, H, W): target statistics -> HR statistics."""
    (mt, vt), (mh, vh) = target, hr
    c = (slice(None), None, None)
    return (x - mt[c]) / np.sqrt(vt[c] + EPS) * np.sqrt(vh[c] + EPS) + mh[c]


def rest_of_graph(c1, first=None, second=None):
    """numpy: c1 -> (y, c2); `first` / `second` transform the convolutions' outputs (the
    inserted BatchNorms)."""
    c1 = c1 if first is None else first(c1)
    p1 = np.where(c1 > 0, c1, W["slope"][None] * c1)
    c2 = np.einsum("nchw,oc->nohw", p1, W["w2"][:, :, 0, 0].astype(np.float64))
    raw_c2 = c2
    c2 = c2 if second is None else second(c2)
    c = (slice(None), None, None)
    n2 = (c2 - W["m"][c]) / np.sqrt(W["v"][c] + 1e-3) * W["s"][c] + W["b"][c]
    return n2.mean(axis=(2, 3)) @ W["wg"].T.astype(np.float64), raw_c2


def model_and_variables(path, batchnorm="every_conv"):
    graph = onnx_graph.read_graph(path)
    model = onnx_graph.OnnxModel(graph, batchnorm=batchnorm)
    return model, onnx_graph.onnx_variables(graph)


def embed(model, variables, images):
    x = (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5
    return np.asarray(model.apply(variables, x)[0], np.float64)


def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_calibrated_batchnorms_are_the_identity_at_the_hr_statistics(graph_path):
    path, probe = graph_path
    model, variables = model_and_variables(path)
    hr = images(12, seed=1)
    calibrated = calibrate_bn.calibrated_variables(model, variables, hr, 12, EPS)
    c1 = first_conv(probe, hr)
    y, c2 = rest_of_graph(c1)
    names = onnx_graph.inserted_batchnorm_names(model.graph)
    assert names == ("bn_c1", "bn_c2")
    for name, activation in zip(names, (c1, c2)):
        mean, var = stats(activation)
        bn_stats, bn_params = calibrated["batch_stats"][name], calibrated["params"][name]
        np.testing.assert_allclose(bn_stats["mean"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn_stats["var"], var, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(bn_params["scale"], np.sqrt(var + EPS), rtol=1e-4)
        np.testing.assert_allclose(bn_params["bias"], mean, rtol=1e-4, atol=1e-5)
    assert set(calibrated["params"]) == set(variables["params"]) | set(names)
    assert set(calibrated["batch_stats"]) == set(variables["batch_stats"]) | set(names)
    # The graph's own BatchNormalization statistics are kept, under their ONNX names.
    for key, value in onnx_graph.onnx_variables(model.graph)["batch_stats"].items():
        np.testing.assert_array_equal(calibrated["batch_stats"][key], value)
    # The calibrated model is the plain graph, on the calibration images and on others.
    np.testing.assert_allclose(embed(model, calibrated, hr), y, rtol=1e-4, atol=1e-5)
    other = images(4, seed=2)
    np.testing.assert_allclose(
        embed(model, calibrated, other), rest_of_graph(first_conv(probe, other))[0], atol=1e-4
    )


def test_adaptation_aligns_each_convolution_to_the_hr_statistics(graph_path):
    path, probe = graph_path
    model, variables = model_and_variables(path)
    hr = images(12, seed=1)
    lr = degrade(images(10, seed=5), 4, SIZE)  # 4 px of information, cubic back to 16
    calibrated = calibrate_bn.calibrated_variables(model, variables, hr, 12, EPS)
    adapted = adapt_bn.BatchNormAdaptation(model).adapted_variables(calibrated, lr, 10)

    # numpy: layer 1 aligned with c1's LR statistics; layer 2's statistics are those of the
    # second convolution on the aligned layer-1 output, as AdaBN adapts layer by layer.
    c1_hr, c1_lr = first_conv(probe, hr), first_conv(probe, lr)
    hr1 = stats(c1_hr)
    hr2 = stats(rest_of_graph(c1_hr)[1])
    lr1 = stats(c1_lr)
    lr2 = stats(rest_of_graph(c1_lr, first=lambda c: align(c, lr1, hr1))[1])
    expected, _ = rest_of_graph(
        c1_lr, first=lambda c: align(c, lr1, hr1), second=lambda c: align(c, lr2, hr2)
    )
    for name, (mean, var) in (("bn_c1", lr1), ("bn_c2", lr2)):
        np.testing.assert_allclose(adapted["batch_stats"][name]["mean"], mean, atol=1e-4)
        np.testing.assert_allclose(adapted["batch_stats"][name]["var"], var, rtol=1e-3)
    assert adapted["params"] is calibrated["params"]  # only the statistics change
    np.testing.assert_allclose(embed(model, adapted, lr), expected, rtol=1e-3, atol=1e-4)
    # Unadapted, the LR output is the plain graph's: the alignment is what changed it.
    plain = rest_of_graph(c1_lr)[0]
    np.testing.assert_allclose(embed(model, calibrated, lr), plain, rtol=1e-4, atol=1e-5)
    assert np.abs(expected - plain).max() > 0.05


def test_an_uncalibrated_model_is_the_plain_graph_and_calibration_fills_it(graph_path, tmp_path):
    path, _ = graph_path
    model, variables = model_and_variables(path)
    plain, _ = model_and_variables(path, batchnorm="off")
    x = images(3, seed=7)
    initial = dict(model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))
    np.testing.assert_allclose(embed(model, initial, x), embed(plain, variables, x), atol=1e-5)

    # calibrate_if_needed: HR images of the training people only, drawn with config.seed.
    root = tmp_path / "faces"
    names = make_fake_lfw(root, people=4, images_per_person=3, size=SIZE)
    people = tmp_path / "people.txt"
    people.write_text("2\n" + "".join(f"{n}\t3\n" for n in names[:2]))
    config = onnx_config(path, onnx_batchnorm="every_conv", onnx_batchnorm_images=4)
    config.data.update(
        train=f"folder:{root / 'aligned112'}", people_file=str(people), worker_count=0
    )
    config.eval.batch_size = 8
    built = build_model(config.model)
    assert built.batchnorm == "every_conv"
    drawn = calibrate_bn.hr_images(config, 4, seed=0)
    assert drawn.shape == (4, SIZE, SIZE, 3)
    folder = root / "aligned112"
    train_files = {n: [read_rgb(folder / n / f) for f in os.listdir(folder / n)] for n in names}
    for image in drawn:  # each one is an undegraded image of a training person
        owners = [n for n, files in train_files.items() if any((f == image).all() for f in files)]
        assert owners and set(owners) <= set(names[:2])
    np.testing.assert_array_equal(calibrate_bn.hr_images(config, 4, seed=0), drawn)
    calibrated = calibrate_bn.calibrate_if_needed(built, variables, config)
    expected = calibrate_bn.calibrated_variables(built, variables, drawn, 8, EPS)
    for name in ("bn_c1", "bn_c2"):
        np.testing.assert_allclose(
            calibrated["batch_stats"][name]["var"], expected["batch_stats"][name]["var"]
        )
    assert calibrate_bn.calibrate_if_needed(built, calibrated, config) is calibrated
    assert calibrate_bn.calibrate_if_needed(plain, variables, config) is variables


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def onnx_config(path, **fields):
    config = defaults.get_base_config()
    config.model.update(name="onnx", onnx_path=path, image_size=SIZE, embed_dim=5, **fields)
    return config


def test_settings_are_checked_and_inserted_batchnorms_are_not_exported(graph_path):
    path, _ = graph_path
    with pytest.raises(ValueError, match="config.model.onnx_batchnorm='after_relu' is not one"):
        build_model(onnx_config(path, onnx_batchnorm="after_relu").model)
    with pytest.raises(ValueError, match="config.model.onnx_batchnorm_images=0 must be >= 1"):
        build_model(onnx_config(path, onnx_batchnorm="every_conv", onnx_batchnorm_images=0).model)
    assert build_model(onnx_config(path).model).batchnorm == "off"  # the default
    model, variables = model_and_variables(path)
    calibrated = calibrate_bn.calibrated_variables(model, variables, images(4, seed=1), 4, EPS)
    with pytest.raises(ValueError, match="BatchNorms inserted for test-time adaptation"):
        onnx_graph.onnx_state_dict(model.graph, calibrated)
    # Without them, the export writes the graph's initializers back as they were.
    exported = onnx_graph.onnx_state_dict(model.graph, variables)
    np.testing.assert_array_equal(exported["w1"], W["w1"])
