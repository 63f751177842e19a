"""FaceEncoder on ONNX files: real and exported models give onnxruntime's embeddings.

- the shared real recognizer (batch fixed at 1 in its graph) on 64 real LFW crops, at batch 1
  and at batch 64 (skipped, saying why, without ../shared/realfaces);
- an IResNet-50 written by torch.onnx.export from our PyTorch twin, BatchNorm not folded;
- our own model.onnx exports (interop/onnx.py) imported back;
- an ONNX file as the initial weights of a native model (config.init_from-style).
"""

from __future__ import annotations

import glob
import os
import warnings

import cv2
import ml_collections
import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from facemoe_jax import FaceEncoder  # noqa: E402
from facemoe_jax.interop.load import load_onnx  # noqa: E402
from facemoe_jax.interop import convert, torch_models  # noqa: E402
from facemoe_jax.interop import onnx as onnx_export  # noqa: E402
from facemoe_jax.interop.onnx import run_graph  # noqa: E402
from tests.interop.test_convert import random_variables  # noqa: E402
from tests.interop.test_convert_cnn import cnn_config  # noqa: E402

REALFACES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "..", "shared", "realfaces")
RECOGNIZER = os.path.join(REALFACES, "models", "faceplugin_fr_feature.onnx")
needs_realfaces = pytest.mark.skipif(
    not os.path.isfile(RECOGNIZER), reason="../shared/realfaces (LFW and its ONNX model) is absent"
)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosines(a, b):
    return np.sum(unit(a) * unit(b), axis=1)


def lfw_crops(n=64):
    files = sorted(glob.glob(os.path.join(REALFACES, "lfw", "aligned112", "*", "*.jpg")))[:n]
    return np.stack([cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB) for f in files])


@needs_realfaces
def test_real_recognizer_gives_onnxruntime_embeddings_at_batch_1_and_64():
    config = ml_collections.ConfigDict(
        {"model": {"name": "onnx", "onnx_input_mean": 127.0, "onnx_input_std": 128.0}}
    )  # the (x - 127) / 128 its README gives
    encoder = FaceEncoder.from_checkpoint(RECOGNIZER, config)
    assert (encoder.image_size, encoder.embed_dim) == (112, 512)
    crops = lfw_crops()
    expected = run_graph(RECOGNIZER, crops, encoder.model)
    batched = encoder.embed(crops, flip_test=False, normalize=False, batch_size=64)
    single = encoder.embed(crops[:8], flip_test=False, normalize=False, batch_size=1)
    print(f"cosine to onnxruntime: min {cosines(batched, expected).min():.7f} (batch 64)")
    assert cosines(batched, expected).min() >= 0.9999
    assert cosines(single, expected[:8]).min() >= 0.9999


@needs_realfaces
def test_real_recognizer_loads_with_no_config_at_all():
    encoder = FaceEncoder.from_checkpoint(RECOGNIZER)
    assert encoder.config.model.name == "onnx"
    # No preprocessing inside the graph: insightface's default (127.5, 127.5).
    assert (encoder.model.input_mean, encoder.model.input_std) == (127.5, 127.5)


@pytest.mark.slow
def test_iresnet50_exported_by_torch_with_batchnorm_unfolded(tmp_path):
    cfg = cnn_config("iresnet", depth=50)
    module = torch_models.torch_model_from_config(cfg).eval()
    with torch.no_grad():  # random running statistics, so BatchNorm is not the identity
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
    path = str(tmp_path / "r50.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(2, 3, 112, 112),),
            path,
            input_names=["images"],
            output_names=["embedding"],
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,  # keeps BatchNormalization nodes
            do_constant_folding=False,
            dynamo=False,
        )
    encoder = FaceEncoder.from_checkpoint(path)
    assert len(encoder.variables["batch_stats"]) > 50  # the statistics are the model's own
    x = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    got = encoder.embed(x, flip_test=False, normalize=False)
    expected = run_graph(path, x, encoder.model)
    assert cosines(got, expected).min() >= 0.9999

    # The same file as initial weights of our native IResNet-50: the initializers are the
    # twin's state_dict, so the native model embeds the same.
    native_cfg = ml_collections.ConfigDict({"model": cfg})
    _, variables = load_onnx(path, native_cfg)
    native = FaceEncoder(native_cfg, variables).embed(x, flip_test=False, normalize=False)
    assert cosines(native, expected).min() >= 0.9999


def test_our_own_exports_import_back(tmp_path):
    # MobileFaceNet: BatchNorm folded by the exporter, depthwise convs, PRelu, the GDC head.
    cfg = cnn_config("mobilefacenet", image_size=32, embed_dim=64)
    model, variables = random_variables(cfg)
    state = convert.jax_to_torch(cfg, variables)
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export.export_onnx(cfg, state, path)
    imported = FaceEncoder.from_checkpoint(path)
    # Our metadata says (x / 255 - 0.5) / 0.5: the import reads it.
    assert (imported.model.input_mean, imported.model.input_std) == (127.5, 127.5)
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    got = imported.embed(x, flip_test=False, normalize=False)
    native = FaceEncoder(ml_collections.ConfigDict({"model": cfg}), variables)
    assert cosines(got, native.embed(x, flip_test=False, normalize=False)).min() >= 0.9999
    assert cosines(got, run_graph(path, x, imported.model)).min() >= 0.9999
