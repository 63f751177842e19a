"""The built-in quality estimator: monotone in resolution, calibrated, size-independent."""

import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.data import degrade, synthetic
from facemoe_jax.models import quality


def faces(n=40, size=48):
    return np.stack([synthetic.render_identity_image(3_000_000 + i, 0, size, 0) for i in range(n)])


def score(images):
    return np.asarray(quality.sharpness_score(jnp.asarray(images, jnp.float32) / 127.5 - 1.0))


def test_score_falls_with_resolution_and_matches_its_calibration():
    hr = faces()
    sizes = (6, 8, 12, 16, 24, 48)
    medians = [
        np.median(score(np.stack([degrade.to_resolution(f, px) for f in hr]))) for px in sizes
    ]
    # Non-decreasing (6 and 8 px are both at the floor), rising from 8 px on.
    assert np.all(np.diff(medians) >= 0) and medians[1] < medians[2] < medians[3] < medians[-1]
    rng = np.random.default_rng(0)
    captured = np.stack([degrade.acquisition_low_resolution(f, rng) for f in hr])
    # The constants: ~0 for a typical 8-16 px capture, ~1 for a full-resolution face.
    assert np.median(score(captured)) < 0.15 and np.median(score(hr)) > 0.85


def test_score_does_not_depend_much_on_the_input_size():
    small, large = score(faces(size=48)), score(faces(size=120))
    assert abs(np.median(small) - np.median(large)) < 0.2


def test_mix_value_follows_the_official_formula_and_sign():
    images = jnp.asarray(faces(4), jnp.float32) / 127.5 - 1.0
    s = score(faces(4))
    np.testing.assert_allclose(
        quality.quality_mix_value(images, threshold=0.3), 0.5 + s - 0.3, rtol=1e-6
    )
    np.testing.assert_allclose(
        quality.quality_mix_value(images, sign=-1.0), 0.5 - (s - 0.5), rtol=1e-6
    )
    custom = quality.estimator("facemoe_jax.models.quality:sharpness_score")
    assert custom is quality.sharpness_score
    with pytest.raises(ValueError, match="config.model.lora.quality='brisque'"):
        quality.estimator("brisque")


# ---- a trained recognizability model's quality head as the estimator


@pytest.mark.slow
def test_recognizability_estimator_scores_as_face_encoder_quality():
    from facemoe_jax.core.images import normalize_images
    from tests.test_encoder_quality import encoder

    enc, _, _ = encoder(quality_head=True)
    images = np.random.default_rng(1).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    score = quality.recognizability_score(enc)
    np.testing.assert_allclose(
        np.asarray(score(jnp.asarray(normalize_images(images)))),
        enc.quality(images),
        rtol=1e-5,
        atol=1e-6,
    )
    # Faces of another size are resized to the model's input first.
    larger = np.asarray(score(jnp.zeros((2, 48, 48, 3))))
    assert larger.shape == (2,) and np.all((larger > 0) & (larger < 1))
    with pytest.raises(ValueError, match="no quality head"):
        quality.recognizability_score(encoder(quality_head=False)[0])


def test_petalface_takes_a_from_a_recognizability_workdir(tmp_path, monkeypatch):
    import jax

    from facemoe_jax.interop import load
    from facemoe_jax.models import build_model
    from tests.test_encoder_quality import encoder

    enc, _, variables = encoder(quality_head=True)
    (tmp_path / "ri" / "checkpoints").mkdir(parents=True)
    restored = (enc.config, {"encoder": variables["params"]}, variables.get("batch_stats", {}), 7)
    monkeypatch.setattr(load, "restore_params", lambda w, step=None: restored)  # tested elsewhere
    config = enc.config.model.copy_and_resolve_references()
    config.quality_head = False
    config.lora.update(
        rank=2,
        quality_mix=True,
        quality_threshold=0.6,
        quality=f"recognizability:{tmp_path / 'ri'}",
    )
    model = build_model(config)
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 24, 24, 3)), jnp.float32)
    a = 0.5 + (np.asarray(quality.recognizability_score(enc)(x)) - 0.6)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x, quality=jnp.asarray(a))
    given = model.apply(params, x, quality=jnp.asarray(a))[0]
    estimated = model.apply(params, x)[0]  # no `a`: the model asks the estimator
    np.testing.assert_allclose(np.asarray(estimated), np.asarray(given), rtol=1e-5, atol=1e-6)

    with pytest.raises(
        ValueError, match="config.model.lora.quality='recognizability:.*does not exist"
    ):
        quality.estimator(f"recognizability:{tmp_path / 'missing'}")
