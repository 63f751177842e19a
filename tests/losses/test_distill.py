"""Instance and relation distillation losses against NumPy formulas written here, and the
relation loss over a batch sharded on 8 fake devices against one device."""

import jax
import numpy as np
import pytest

from facemoe_jax.losses.distill import instance_loss, relation_loss
from tests.check_scripts import json_report, run_check_script

RNG = np.random.default_rng(0)
STUDENT = RNG.normal(size=(6, 5)).astype(np.float32)
TEACHER = (STUDENT + RNG.normal(scale=0.7, size=(6, 5))).astype(np.float32) * 3.0
WIDE_TEACHER = RNG.normal(size=(6, 9)).astype(np.float32)


def unit(x):
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_relation_kl(s, t, tau):
    n = len(s)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        zs = np.array([unit(s)[i] @ unit(s)[j] for j in others]) / tau
        zt = np.array([unit(t)[i] @ unit(t)[j] for j in others]) / tau
        ps, pt = np.exp(zs) / np.exp(zs).sum(), np.exp(zt) / np.exp(zt).sum()
        total += np.sum(pt * np.log(pt / ps))
    return total / n * tau**2


def test_instance_cosine_and_mse():
    cos = np.sum(unit(STUDENT) * unit(TEACHER), axis=1)
    np.testing.assert_allclose(float(instance_loss(STUDENT, TEACHER)), np.mean(1 - cos), rtol=1e-5)
    mse = np.mean((unit(STUDENT) - unit(TEACHER)) ** 2)
    np.testing.assert_allclose(float(instance_loss(STUDENT, TEACHER, "mse")), mse, rtol=1e-5)
    assert float(instance_loss(TEACHER, TEACHER)) == pytest.approx(0.0, abs=1e-6)


def test_relation_mse_over_all_pairs_and_any_embedding_sizes():
    for teacher in (TEACHER, WIDE_TEACHER):
        gram_s, gram_t = unit(STUDENT) @ unit(STUDENT).T, unit(teacher) @ unit(teacher).T
        expected = np.mean((gram_s - gram_t) ** 2)
        np.testing.assert_allclose(float(relation_loss(STUDENT, teacher)), expected, rtol=1e-5)
    # Invariant to each row's scale: only directions count.
    assert float(relation_loss(STUDENT, STUDENT * 7.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_relation_kl_of_row_softmaxes_without_the_diagonal(tau):
    ours = float(relation_loss(STUDENT, WIDE_TEACHER, "kl", temperature=tau))
    np.testing.assert_allclose(ours, np_relation_kl(STUDENT, WIDE_TEACHER, tau), rtol=1e-4)
    grad = jax.grad(lambda s: relation_loss(s, WIDE_TEACHER, "kl", tau))(STUDENT)
    assert np.isfinite(np.asarray(grad)).all()


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="config.distill.instance_form='l1'"):
        instance_loss(STUDENT, TEACHER, "l1")
    with pytest.raises(ValueError, match="config.distill.relation_form='dot'"):
        relation_loss(STUDENT, TEACHER, "dot")
    with pytest.raises(ValueError, match="embed_dim"):
        instance_loss(STUDENT, WIDE_TEACHER)


@pytest.mark.slow
def test_sharded_relation_loss_on_8_devices_equals_one_device():
    report = json_report(run_check_script(__file__, "distill_multidevice_check.py"))
    assert report["devices"] == 8
    for name, r in report["losses"].items():
        assert r["sharded"] == pytest.approx(r["single"], rel=1e-5, abs=1e-7), name
        assert r["spec_data_axes"], name  # the input really was split over the batch axes
    step = report["train_step"]
    # The distillation metrics of the whole loss on the 8 x 1 mesh: the global batch's.
    for key in ("train/distill_instance", "train/distill_relation", "train/loss"):
        assert step["sharded"][key] == pytest.approx(step["single"][key], rel=1e-5), key
    assert step["grad_diff"] < 1e-5 * step["grad_scale"]
