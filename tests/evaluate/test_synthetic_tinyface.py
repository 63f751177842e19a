"""The synthetic TinyFace-like protocol: who is where, what is degraded, what is reported."""

import numpy as np
import pytest

from configs import common
from facemoe_jax.data import synthetic
from facemoe_jax.evaluate import synthetic_tinyface, tinyface


def protocol_config(**eval_fields):
    config = common.get_base_config()
    config.model.image_size = 32
    config.eval.update(
        synthetic_tinyface_identities=4,
        synthetic_tinyface_probes=2,
        synthetic_tinyface_distractors=3,
        **eval_fields,
    )
    return config


def test_probes_are_lr_captures_and_the_gallery_is_hr_matches_plus_distractors():
    config = protocol_config()
    p = synthetic_tinyface.build_protocol(config)
    assert p["probes"].shape == (8, 32, 32, 3) and p["gallery"].shape == (7, 32, 32, 3)
    np.testing.assert_array_equal(p["probe_labels"], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(
        p["gallery_labels"], [0, 1, 2, 3] + [tinyface.DISTRACTOR_LABEL] * 3
    )
    first = synthetic.TINYFACE_FIRST_IDENTITY
    np.testing.assert_array_equal(
        p["gallery"][2], synthetic.render_identity_image(first + 2, 0, 32, 0)
    )
    np.testing.assert_array_equal(
        p["hr_probes"][3], synthetic.render_identity_image(first + 1, 2, 32, 0)
    )
    assert np.abs(p["probes"].astype(int) - p["hr_probes"]).mean() > 3
    again = synthetic_tinyface.build_protocol(config)
    np.testing.assert_array_equal(again["probes"], p["probes"])


def test_metrics_with_an_embedding_that_reads_the_identity_from_the_gallery():
    """An embedder that maps each image to the gallery index it is closest to in pixels
    recognises the HR probes (same person, other image) better than chance; the ranks keys and
    the HR column are there."""
    config = protocol_config(synthetic_tinyface_ranks="1,2")
    metrics = synthetic_tinyface.evaluate_synthetic_tinyface(
        lambda images: images.reshape(len(images), -1).astype(np.float32) - 128.0, config
    )
    assert set(metrics) == {"rank1", "rank2", "hr_rank1"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["rank2"] >= metrics["rank1"]


def test_bad_ranks_are_a_config_error():
    with pytest.raises(ValueError, match="synthetic_tinyface_ranks='0,5'"):
        synthetic_tinyface.check_config(protocol_config(synthetic_tinyface_ranks="0,5"))
