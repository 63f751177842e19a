"""Expert parallelism and the class-sharded classifier on 8 fake CPU devices equal one device.

The computations run in a subprocess (multidevice_check.py) so that the 8-device XLA flag does
not leak into the rest of the suite; this module asserts on the JSON it prints.
"""

import numpy as np
import pytest

from tests.check_scripts import json_report, run_check_script

MESHES = ("8x1", "4x2", "2x4", "1x8")


@pytest.fixture(scope="module")
def report():
    return json_report(run_check_script(__file__, "multidevice_check.py", timeout=900))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["capacity", "dropless"])
@pytest.mark.parametrize("mesh", MESHES)
def test_forward_loss_and_gradients_equal_single_device(report, path, mesh):
    r = report[path][mesh]
    assert r["embedding_diff"] < 1e-5
    assert r["loss_diff"] < 1e-5 * abs(report[path]["reference_loss"])
    # float32 reductions in a different order: relative to the largest gradient entry.
    assert r["grad_diff"] < 1e-5 * r["grad_scale"]


@pytest.mark.slow
def test_tokens_reach_experts_by_all_to_all(report):
    assert report["capacity"]["8x1"]["collectives"]["all-to-all"] == 0
    for mesh in ("4x2", "2x4", "1x8"):
        assert report["capacity"][mesh]["collectives"]["all-to-all"] > 0
        assert report["dropless"][mesh]["collectives"]["reduce-scatter"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("path", ["capacity", "dropless"])
def test_expert_bytes_per_device_fall_with_the_expert_axis(report, path):
    bytes_at = {m: report[path][m]["device0_expert_bytes"] for m in MESHES}
    assert bytes_at["4x2"] * 2 == bytes_at["8x1"]
    assert bytes_at["2x4"] * 4 == bytes_at["8x1"]
    assert bytes_at["1x8"] * 8 == bytes_at["8x1"]
    # The class centres (40 padded rows x 32) are split over all 8 devices on every mesh.
    assert all(report[path][m]["device0_center_bytes"] == 40 * 32 * 4 // 8 for m in MESHES)
    assert report[path]["1x8"]["device0_param_bytes"] < report[path]["8x1"]["device0_param_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("margin", ["classifier_cosface", "classifier_adaface"])
def test_class_sharded_loss_equals_unsharded(report, margin):
    r = report[margin]
    assert r["loss_diff"] < 1e-5 * r["loss"]
    assert r["accuracy_diff"] == 0.0
    assert r["grad_diff"] < 1e-4
    assert r["rows_with_grad"] == 37  # every real class, no padding row
    assert r["padding_rows_with_grad"] == 0


@pytest.mark.slow
def test_class_sharded_partial_fc_samples_per_device(report):
    r = report["classifier_sampled"]
    # Each of the 8 devices keeps max(int(101 * 0.3), 16) = 30 of its 101 rows, labels included.
    assert r["label_rows_with_grad"] == 16  # every label's centre is always in the sample
    assert r["padding_rows_with_grad"] == 0
    # Only the sampled rows learn; the last device may spend up to its 5 padding rows.
    assert 8 * 30 - 5 <= r["rows_with_grad"] <= 8 * 30


def _numpy_balance_losses(logits: np.ndarray, top_k: int = 2) -> tuple[float, float]:
    """(official, Switch) load balance of (images, tokens, E) logits, from the formulas."""
    num_experts = logits.shape[-1]
    flat = logits.reshape(-1, num_experts).astype(np.float64)
    probs = np.exp(flat - flat.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.zeros_like(probs)
    np.put_along_axis(chosen, np.argsort(-flat, axis=-1)[:, :top_k], 1.0, axis=-1)
    tokens = flat.shape[0]
    official = num_experts * np.sum(probs.sum(0) * chosen.sum(0)) / tokens**2
    switch = num_experts * np.sum(chosen.sum(0) / chosen.sum() * probs.mean(0))
    return official, switch


@pytest.mark.slow
def test_per_device_balance_loss_is_the_mean_of_each_devices_loss(report):
    r = report["router_statistics"]
    logits = np.asarray(r["logits"])  # (16 images, 5 tokens, 8 experts); 8 devices x 2 images
    official, switch = _numpy_balance_losses(logits)
    per_device = [_numpy_balance_losses(block) for block in np.split(logits, 8)]
    expected = {
        "official_load_balance_loss": official,
        "load_balance_loss": switch,
        "official_load_balance_loss/per_device": np.mean([o for o, _ in per_device]),
        "load_balance_loss/per_device": np.mean([s for _, s in per_device]),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(r["mesh"][key], value, rtol=1e-5, err_msg=key)
    # One device: "per_device" is the global batch.
    for key in ("official_load_balance_loss", "load_balance_loss"):
        np.testing.assert_allclose(r["single"][key + "/per_device"], r["single"][key], rtol=1e-6)
        np.testing.assert_allclose(r["single"][key], expected[key], rtol=1e-5)
    # The devices route differently, so the two statistics differ here.
    assert abs(expected["official_load_balance_loss/per_device"] - official) > 1e-3
