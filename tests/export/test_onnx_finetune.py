"""An imported ONNX model fine-tunes with part of it frozen and exports back to ONNX.

A small graph with an unfolded BatchNorm (written with onnx.helper) is the model of a short
`python -m facemoe_jax.main` run (config.model.name="onnx", config.train.trainable = the head);
`--mode=export` writes the graph with the trained weights, which onnxruntime runs to the
fine-tuned JAX embeddings, and model.safetensors holds the same tensors under the ONNX names.
`--mode=eval` before any training evaluates the file's own weights.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from onnx import helper, numpy_helper  # noqa: E402

from facemoe_jax import FaceEncoder  # noqa: E402
from facemoe_jax.interop.onnx import run_graph  # noqa: E402
from facemoe_jax.models import onnx_graph  # noqa: E402
from tests.models.test_onnx_graph import write_graph  # noqa: E402
from tests.test_main import run_main, tiny_run_args  # noqa: E402


def small_face_graph(path):
    rng = np.random.default_rng(0)

    def tensor(name, *shape, value=None):
        value = rng.normal(0, 0.3, shape) if value is None else value
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "stem.weight"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
            ["n"],
        ),
        helper.make_node("PRelu", ["n", "act.weight"], ["p"]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "head.weight", "head.bias"], ["y"], transB=1),
    ]
    inits = [
        tensor("stem.weight", 8, 3, 3, 3),
        tensor("bn.weight", value=np.ones(8)),
        tensor("bn.bias", value=np.zeros(8)),
        tensor("bn.running_mean", value=np.zeros(8)),
        tensor("bn.running_var", value=np.ones(8)),
        tensor("act.weight", 8, 1, 1),
        tensor("head.weight", 16, 8),
        tensor("head.bias", 16),
    ]
    return write_graph(path, nodes, inits, size=16, out_dim=16)


def onnx_run_args(workdir, source):
    """The tiny demo run of tests/test_main.py with the small graph as its model."""
    return tiny_run_args(workdir, steps=3) + [
        "--config.model.name=onnx",
        f"--config.model.onnx_path={source}",
        "--config.model.image_size=16",
        "--config.model.embed_dim=16",
        "--config.eval.low_resolutions=",
    ]


@pytest.mark.slow
def test_finetune_with_frozen_stem_then_export_back(tmp_path):
    source = small_face_graph(tmp_path / "face.onnx")
    workdir = tmp_path / "run"
    args = onnx_run_args(workdir, source) + [
        "--config.train.trainable=head,classifier",
        "--config.train.update_batch_stats=True",
    ]
    trained = run_main(*args)
    assert trained.returncode == 0, trained.stderr
    assert "warning" not in trained.stderr  # no "frozen weights are random": they are the file's
    exported = run_main(*args, "--mode=export")
    assert exported.returncode == 0, exported.stderr

    encoder = FaceEncoder.from_checkpoint(str(workdir))
    before = onnx_graph.onnx_state_dict(
        onnx_graph.read_graph(source), onnx_graph.onnx_variables(onnx_graph.read_graph(source))
    )
    after = onnx_graph.onnx_state_dict(encoder.model.graph, encoder.variables)
    assert np.array_equal(before["stem.weight"], after["stem.weight"])  # frozen
    assert np.array_equal(before["act.weight"], after["act.weight"])
    assert not np.allclose(before["head.weight"], after["head.weight"])  # trained
    assert not np.allclose(before["bn.running_mean"], after["bn.running_mean"])  # updated stats

    out = os.path.join(workdir, "export")
    x = np.random.default_rng(3).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    expected = encoder.embed(x, flip_test=False, normalize=False)
    got = run_graph(os.path.join(out, "model.onnx"), x, encoder.model)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    tensors = safetensors_numpy.load_file(os.path.join(out, "model.safetensors"))
    assert set(tensors) == set(after)
    np.testing.assert_array_equal(tensors["head.weight"], after["head.weight"])
    # The export directory loads back as an encoder, from its model.onnx.
    reloaded = FaceEncoder.from_checkpoint(out)
    np.testing.assert_allclose(
        reloaded.embed(x, flip_test=False, normalize=False), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
def test_eval_of_an_onnx_model_before_training_uses_the_file(tmp_path):
    source = small_face_graph(tmp_path / "face.onnx")
    workdir = tmp_path / "new"  # does not exist yet
    args = onnx_run_args(workdir, source) + ["--mode=eval"]
    done = run_main(*args)
    assert done.returncode == 0, done.stderr
    assert f"evaluating {source} as it is" in done.stdout
    assert os.path.isfile(os.path.join(workdir, "eval", "step0_eval", "results.json"))
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_writing_back_twice_keeps_one_metadata_entry(tmp_path):
    # A fine-tuned export fine-tuned again: its graph is the source of the second export.
    from facemoe_jax.interop import onnx as onnx_export

    source = small_face_graph(tmp_path / "face.onnx")
    graph = onnx_graph.read_graph(source)
    state = onnx_graph.onnx_state_dict(graph, onnx_graph.onnx_variables(graph))
    first, second = str(tmp_path / "first.onnx"), str(tmp_path / "second.onnx")
    onnx_export.export_onnx_weights(source, state, first)
    onnx_export.export_onnx_weights(first, state, second)
    model = onnx.load(second)
    keys = [p.key for p in model.metadata_props]
    assert keys.count(onnx_export.WEIGHTS_KEY) == 1
    onnx.checker.check_model(model)
