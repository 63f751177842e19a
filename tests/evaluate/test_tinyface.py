"""TinyFace identification: .mat / folder lists, blocked rank-k against a brute-force ranking."""

import cv2
import numpy as np
import pytest
import scipy.io

from facemoe_jax.evaluate import tinyface


def _brute_force_rank_k(probe, probe_labels, gallery, gallery_labels, ks):
    p = probe / np.linalg.norm(probe, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    order = np.argsort(-(p @ g.T), axis=1)  # the full Q x G matrix, sorted
    return {
        f"rank{k}": np.mean(
            [probe_labels[q] in gallery_labels[order[q, :k]] for q in range(len(probe))]
        )
        for k in ks
    }


@pytest.mark.parametrize("block_size", [7, 1000])
def test_rank_k_matches_brute_force(block_size):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 8))
    gallery_labels = np.r_[np.arange(12), np.arange(12), np.full(50, -100)]
    gallery = np.r_[centres, centres, rng.normal(size=(50, 8))] + rng.normal(0, 0.9, (74, 8))
    probe_labels = np.r_[np.arange(12), np.arange(6), 99]  # 99 has no match: always a miss
    probe = np.r_[centres, centres[:6], rng.normal(size=(1, 8))] + rng.normal(0, 0.9, (19, 8))
    got = tinyface.rank_k_accuracy(
        probe, probe_labels, gallery, gallery_labels, (1, 5, 20), block_size
    )
    expected = _brute_force_rank_k(probe, probe_labels, gallery, gallery_labels, (1, 5, 20))
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got["rank1"] < got["rank20"] < 1


def test_top_k_gallery_order_and_blocks():
    probe = np.array([[1.0, 0.0]])
    gallery = np.array([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.5]])
    index, scores = tinyface.top_k_gallery(probe, gallery, 3, block_size=2)
    np.testing.assert_array_equal(index, [[2, 1, 4]])
    np.testing.assert_allclose(scores, [[1.0, 1 / np.sqrt(1.01), 1 / np.sqrt(1.25)]], rtol=1e-6)


def _image(path, value, size):
    cv2.imwrite(str(path), np.full((size, size, 3), value, np.uint8))


def _make_tinyface(root, mat_dir=None, wrong_id=False):
    for folder in ("Probe", "Gallery_Match", "Gallery_Distractor"):
        (root / folder).mkdir(parents=True)
    # Aligned copy: PNG files, while the .mat lists name the original JPEGs.
    for name in ("7_1.png", "9_1.png"):
        _image(root / "Probe" / name, 30, 20)
    for name in ("7_2.png", "7_3.png", "9_2.png"):
        _image(root / "Gallery_Match" / name, 60, 16)
    for name in ("d_0.png", "d_1.png"):
        _image(root / "Gallery_Distractor" / name, 90, 30)
    if mat_dir is not None:
        mat_dir.mkdir(exist_ok=True)
        cells = np.empty((2, 1), object)
        cells[0, 0], cells[1, 0] = np.array(["9_1.jpg"]), np.array(["7_1.jpg"])
        scipy.io.savemat(
            mat_dir / "probe_img_ID_pairs.mat",
            {"probe_set": cells, "probe_ids": np.array([[9], [8 if wrong_id else 7]])},
        )
        cells = np.empty((3, 1), object)
        for i, n in enumerate(["7_2.jpg", "9_2.jpg", "7_3.jpg"]):
            cells[i, 0] = np.array([n])
        scipy.io.savemat(
            mat_dir / "gallery_match_img_ID_pairs.mat",
            {"gallery_set": cells, "gallery_ids": np.array([[7], [9], [7]])},
        )


def test_protocol_from_mat_files(tmp_path):
    _make_tinyface(tmp_path / "aligned", mat_dir=tmp_path / "mats")
    protocol = tinyface.TinyFaceProtocol(str(tmp_path / "aligned"), str(tmp_path / "mats"))
    assert [p.split("/")[-1] for p in protocol.probe_paths] == ["9_1.png", "7_1.png"]
    np.testing.assert_array_equal(protocol.probe_labels, [9, 7])
    gallery = ["7_2.png", "9_2.png", "7_3.png", "d_0.png", "d_1.png"]
    assert [p.split("/")[-1] for p in protocol.gallery_paths] == gallery
    np.testing.assert_array_equal(protocol.gallery_labels, [7, 9, 7, -100, -100])
    assert protocol.load(protocol.probe_paths[0], 48).shape == (48, 48, 3)

    # Hand-made features: probe 9 is nearest a distractor, then its match; probe 7 its match.
    feats = {
        "9_1": [1, 0],
        "7_1": [0, 1],
        "7_2": [0.2, 1],
        "9_2": [1, 0.6],
        "7_3": [-1, 0.1],
        "d_0": [1, 0.1],
        "d_1": [-1, -1],
    }

    def features_of(paths):
        return np.array([feats[p.split("/")[-1][:-4]] for p in paths], float)

    probe_feats = features_of(protocol.probe_paths)
    gallery_feats = features_of(protocol.gallery_paths)
    got = tinyface.rank_k_accuracy(
        probe_feats, protocol.probe_labels, gallery_feats, protocol.gallery_labels, (1, 2, 5)
    )
    assert got == {"rank1": 0.5, "rank2": 1.0, "rank5": 1.0}


def test_protocol_from_folders_and_errors(tmp_path):
    _make_tinyface(tmp_path / "t")
    protocol = tinyface.TinyFaceProtocol(str(tmp_path / "t"))
    np.testing.assert_array_equal(protocol.probe_labels, [7, 9])
    np.testing.assert_array_equal(protocol.gallery_labels, [7, 7, 9, -100, -100])

    _make_tinyface(tmp_path / "u", mat_dir=tmp_path / "u", wrong_id=True)
    with pytest.raises(ValueError, match=r"probe_img_ID_pairs.mat: 7_1.jpg has id 8"):
        tinyface.TinyFaceProtocol(str(tmp_path / "u"))
    with pytest.raises(ValueError, match="tinyface_dir=.*is not a directory"):
        tinyface.TinyFaceProtocol(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="does not start with an integer"):
        tinyface.identity_of("abc_1.jpg")


def test_evaluate_tinyface_uses_the_loader(tmp_path):
    _make_tinyface(tmp_path / "t")
    protocol = tinyface.TinyFaceProtocol(str(tmp_path / "t"))

    def embed_files(load, count):
        # Feature = (mean pixel value, 1): probes (30) sit nearest the matches (60).
        return np.array([[load(i).mean(), 1.0] for i in range(count)])

    result = tinyface.evaluate_tinyface(protocol, embed_files, image_size=24)
    probe = np.array([[30.0, 1.0]] * 2)
    gallery = np.array([[60.0, 1.0]] * 3 + [[90.0, 1.0]] * 2)
    assert result == tinyface.rank_k_accuracy(
        probe, protocol.probe_labels, gallery, protocol.gallery_labels
    )


def _textured_face(size, seed):
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (size, size, 3)).astype(np.float32), (0, 0), 1.2)
    return np.clip((noise - noise.mean()) * 4 + 128, 0, 255).astype(np.uint8)


def test_load_matches_the_official_tinyface_preprocessing(tmp_path):
    # FaceMoE validation_lq/validate_tinyface.py, as facts: cv2.imread (BGR) of the 112 px
    # aligned face, cv2.cvtColor BGR -> RGB, PIL Image.fromarray, torchvision
    # Resize((120, 120), BICUBIC) = PIL's bicubic resize (uint8 out), ToTensor + Normalize(0.5,
    # 0.5) = (x/255 - 0.5)/0.5 (tested with the embedder below).
    from PIL import Image

    worst, bilinear_gap = 0, []
    for seed in range(4):
        path = tmp_path / f"{seed}_1.png"
        cv2.imwrite(str(path), _textured_face(112, seed))
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        expected = np.asarray(Image.fromarray(rgb).resize((120, 120), Image.Resampling.BICUBIC))
        ours = tinyface.TinyFaceProtocol.load(str(path), 120)
        assert ours.shape == (120, 120, 3) and ours.dtype == np.uint8
        worst = max(worst, int(np.abs(ours.astype(int) - expected).max()))
        bilinear = cv2.resize(rgb, (120, 120), interpolation=cv2.INTER_LINEAR)  # the old filter
        bilinear_gap.append(np.abs(bilinear.astype(int) - expected).mean())
    assert worst == 0
    assert min(bilinear_gap) > 1.0  # measured 3.2-3.4 grey levels (OpenCV bicubic: 1.9)


def test_flip_fusion_and_normalisation_match_pre_norm_vector_add(tiny_model):
    # The TinyFace script's default fusion `pre_norm_vector_add`: f / |f| * |f| summed over the
    # image and its mirror (torch.flip over the width of the resized image), then L2-normalised;
    # pixels (x/255 - 0.5)/0.5. The model's input here is 48 px.
    import jax.numpy as jnp

    from facemoe_jax.evaluate import embed

    config, model, variables = tiny_model
    images = np.stack([_textured_face(48, s) for s in range(3)])
    x = (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5
    plain, _ = model.apply(variables, x, train=False)
    mirrored, _ = model.apply(variables, x[:, :, ::-1], train=False)
    plain, mirrored = np.asarray(plain, np.float64), np.asarray(mirrored, np.float64)
    norms = [np.linalg.norm(f, axis=1, keepdims=True) for f in (plain, mirrored)]
    fused = plain / norms[0] * norms[0] + mirrored / norms[1] * norms[1]
    expected = fused / np.linalg.norm(fused, axis=1, keepdims=True)
    ours = embed.make_embed_fn(model, flip_test=True)(variables, images)
    got = tinyface._normalize(np.asarray(ours))
    np.testing.assert_allclose(got, expected, atol=1e-5)
