"""Resolution sweeps and expert routing maps."""

import jax
import numpy as np
import pytest

from facemoe_jax.core.images import normalize_images
from facemoe_jax.data import degrade
from facemoe_jax.evaluate import routing_map, sweep


def test_degrade_images_and_parsing():
    images = np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3), np.uint8)
    np.testing.assert_array_equal(sweep.degrade_images(images, 24), images)
    np.testing.assert_array_equal(sweep.degrade_images(images, 112), images)
    low = sweep.degrade_images(images, 6)
    np.testing.assert_array_equal(low[1], degrade.to_resolution(images[1], 6))
    assert sweep.parse_sizes("8, 16") == (8, 16)
    assert sweep.parse_sides("both,probe") == ("both", "probe")
    with pytest.raises(ValueError, match="low_resolutions='8,x'"):
        sweep.parse_sizes("8,x")
    with pytest.raises(ValueError, match=r"low_resolution_sides='gallery'"):
        sweep.parse_sides("gallery")


def test_resolution_sweep_degrades_the_right_side():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (4, 16, 16, 3), np.uint8)
    b = rng.integers(0, 256, (4, 16, 16, 3), np.uint8)
    issame = np.array([True, False, True, False])

    embedded = []

    def embed(images):  # the flattened pixels
        embedded.append(len(images))
        return images.reshape(len(images), -1).astype(float)

    def verify(emb_a, emb_b, same):  # records what it was given
        return {"a": emb_a.copy(), "b": emb_b.copy()}

    out = sweep.resolution_sweep("lfw", embed, verify, a, b, issame, (4, 16), ("both", "probe"))
    assert sum(embedded) == sweep.images_to_embed(4, (4, 16), ("both", "probe"))  # progress total
    assert list(out) == ["lfw@4px", "lfw@16px", "lfw@probe4px", "lfw@probe16px"]
    np.testing.assert_array_equal(out["lfw@4px"]["a"], embed(sweep.degrade_images(a, 4)))
    np.testing.assert_array_equal(out["lfw@4px"]["b"], embed(sweep.degrade_images(b, 4)))
    np.testing.assert_array_equal(out["lfw@probe4px"]["a"], embed(a))
    np.testing.assert_array_equal(out["lfw@probe4px"]["b"], embed(sweep.degrade_images(b, 4)))
    np.testing.assert_array_equal(out["lfw@16px"]["b"], embed(b))


def test_first_choice_shares_by_loop():
    logits = np.random.default_rng(2).normal(size=(7, 9, 3))
    logits[0, 0] = [1.0, 1.0, 0.0]  # a tie goes to the lower expert
    shares = routing_map.first_choice_shares(logits)
    expected = np.zeros((9, 3))
    for n in range(7):
        for s in range(9):
            expected[s, int(np.argmax(logits[n, s]))] += 1 / 7
    np.testing.assert_allclose(shares, expected)
    summary = routing_map.routing_summary(np.array([[1.0, 0], [0.5, 0.5], [0.25, 0.75]]))
    assert summary == {"positional_purity": pytest.approx(2.25 / 3), "experts_used": 2.0}


def test_collected_router_logits_reproduce_the_model_routing(tiny_model):
    config, model, variables = tiny_model
    images = np.random.default_rng(3).integers(0, 256, (5, 48, 48, 3), np.uint8)
    logits = routing_map.collect_router_logits(model, variables, images, batch_size=4)
    assert list(logits) == ["blocks_0/moe/router", "blocks_1/moe/router"]
    grid = (48 // config.model.patch_size) ** 2
    assert all(x.shape == (5, grid, config.model.num_experts) for x in logits.values())

    # Independent check: the model's own router metric (share of top-k assignments per expert,
    # stacked over MoE layers) equals the top-k of the collected logits.
    embeddings, metrics = model.apply(variables, normalize_images(images), train=False)
    top_k = config.model.top_k
    for layer, x in enumerate(logits.values()):
        chosen = np.argsort(-x, axis=-1, kind="stable")[..., :top_k]
        load = np.bincount(chosen.reshape(-1), minlength=x.shape[-1]) / chosen.size
        np.testing.assert_allclose(metrics["expert_load"][layer], load, atol=1e-6)
    # Collecting intermediates does not change the embeddings.
    again, _ = jax.jit(lambda v, im: model.apply(v, im, train=False, mutable=["intermediates"])[0])(
        variables, normalize_images(images)
    )
    np.testing.assert_allclose(again, embeddings, atol=1e-5)
