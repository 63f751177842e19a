"""Router auxiliary losses against NumPy formulas on a hand-made T=4, E=3, k=2 example."""

import math

import jax.numpy as jnp
import numpy as np

from facemoe_jax.losses.routing import (
    expert_load_fractions,
    load_balance_loss,
    official_load_balance_loss,
    official_router_z_loss,
    router_entropy,
    router_z_loss,
)

LOGITS = np.array(
    [[2.0, 1.0, -1.0], [0.5, 3.0, 0.0], [-2.0, 0.0, 1.0], [1.0, -0.5, 0.2]], np.float32
)
# Top-2 of each row, read off by hand: {0,1}, {0,1}, {1,2}, {0,2}.
MASK = np.array([[1, 1, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]], np.float32)
T, E, K = 4, 3, 2


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


PROBS = _softmax(LOGITS.astype(np.float64)).astype(np.float32)


def test_router_z_loss():
    lse = np.log(np.exp(LOGITS.astype(np.float64)).sum(axis=1))
    np.testing.assert_allclose(float(router_z_loss(LOGITS)), np.mean(lse**2), rtol=1e-6)


def test_official_router_z_loss_is_mean_square_without_coefficient():
    # Sum of squares of the 12 logits, row by row: 6 + 9.25 + 5 + 1.29 = 21.54.
    np.testing.assert_allclose(float(official_router_z_loss(LOGITS)), 21.54 / 12, rtol=1e-6)


def test_load_balance_loss():
    mean_prob = PROBS.mean(axis=0)
    share = MASK.sum(axis=0) / (T * K)  # (3, 3, 2) / 8
    np.testing.assert_allclose(share, [3 / 8, 3 / 8, 2 / 8])
    expected = E * np.sum(share * mean_prob)
    np.testing.assert_allclose(float(load_balance_loss(PROBS, MASK)), expected, rtol=1e-6)


def test_official_load_balance_loss():
    importance = PROBS.sum(axis=0)
    load = MASK.sum(axis=0)
    expected = E * np.sum(importance * load) / T**2
    np.testing.assert_allclose(float(official_load_balance_loss(PROBS, MASK)), expected, rtol=1e-6)
    # The official form is k times the Switch form.
    np.testing.assert_allclose(
        float(official_load_balance_loss(PROBS, MASK)),
        K * float(load_balance_loss(PROBS, MASK)),
        rtol=1e-6,
    )


def test_uniform_routing_gives_one_and_k():
    probs = np.full((3, 3), 1 / 3, np.float32)
    mask = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], np.float32)  # each expert chosen twice
    np.testing.assert_allclose(float(load_balance_loss(probs, mask)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(official_load_balance_loss(probs, mask)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(router_entropy(probs)), math.log(3), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(expert_load_fractions(mask)), [1 / 3] * 3, rtol=1e-6)


def test_collapsed_routing_gives_num_experts():
    probs = np.array([[1.0, 0.0, 0.0]] * 4, np.float32)
    mask = np.array([[1, 0, 0]] * 4, np.float32)  # k = 1, all on expert 0
    np.testing.assert_allclose(float(load_balance_loss(probs, mask)), 3.0, rtol=1e-6)
    assert float(router_entropy(probs)) == 0.0  # 0 log 0 = 0, no NaN


def test_router_entropy_and_load_fractions():
    expected_entropy = np.mean(-np.sum(PROBS * np.log(PROBS), axis=1))
    np.testing.assert_allclose(float(router_entropy(PROBS)), expected_entropy, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(expert_load_fractions(MASK)), [3 / 8, 3 / 8, 2 / 8])


def test_leading_dimensions_are_flattened():
    logits = LOGITS.reshape(2, 2, 3)
    probs = PROBS.reshape(2, 2, 3)
    mask = MASK.reshape(2, 2, 3)
    pairs = [
        (router_z_loss(logits), router_z_loss(LOGITS)),
        (official_router_z_loss(logits), official_router_z_loss(LOGITS)),
        (load_balance_loss(probs, mask), load_balance_loss(PROBS, MASK)),
        (official_load_balance_loss(probs, mask), official_load_balance_loss(PROBS, MASK)),
        (router_entropy(probs), router_entropy(PROBS)),
    ]
    for batched, flat in pairs:
        np.testing.assert_allclose(float(batched), float(flat), rtol=1e-6)
    assert router_z_loss(jnp.asarray(LOGITS, jnp.bfloat16)).dtype == jnp.float32
