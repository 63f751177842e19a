"""FaceEncoder, --mode=export and --mode=import end to end on a tiny Swin-MoE.

Train two steps, export, and check that every way of loading the model embeds identically:
the Orbax workdir, the export dir (safetensors), the exported model.pt in our PyTorch twin
(strict=True), and a new run started from the export with --mode=import.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch

import facemoe_jax
from configs import swin_moe_120
from facemoe_jax import FaceEncoder
from facemoe_jax import main as cli
from facemoe_jax.interop import torch_models


def tiny_swin_run_config():
    config = swin_moe_120.get_config("tinyface_full")
    config.model.update(image_size=12, patch_size=2, width=8, embed_dim=8)
    # One block per stage keeps the train-step compilation short (shifted windows: tests/interop).
    config.model.depths, config.model.stage_heads, config.model.window_size = (1, 1), (1, 2), 3
    config.train.update(num_steps=2, batch_size=4, log_every_steps=1)
    config.data.update(num_classes=6, synthetic_images_per_identity=2)
    config.eval.update(synthetic_pairs=0)
    config.optimizer.update(warmup_steps=0)
    config.checkpoint.update(every_steps=2)
    return config


@pytest.mark.slow
def test_import_train_export_and_face_encoder_agree(tmp_path):
    from facemoe_jax.interop import convert
    from tests.interop.test_convert import random_variables

    # PyTorch weights to start from (as a user's model.pt), then --mode=import with lr=0: the
    # run trains (BatchNorm statistics move) but its parameters stay the imported ones.
    config = tiny_swin_run_config()
    _, source = random_variables(config.model)
    convert.save_torch(convert.jax_to_torch(config.model, source), str(tmp_path / "init.pt"))
    config.init_from = str(tmp_path / "init.pt")
    config.optimizer.update(learning_rate=0.0, weight_decay=0.0)
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="init_from"):
        cli.run(tiny_swin_run_config(), workdir, "import")
    cli.run(config, workdir, "import")
    from_workdir = FaceEncoder.from_checkpoint(workdir)
    assert from_workdir.step == 2
    for a, b in zip(
        jax.tree.leaves(from_workdir.variables["params"]), jax.tree.leaves(source["params"])
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    paths = cli.run(config, workdir, "export")
    for name in ("model.pt", "model.safetensors", "model.onnx", "config.json"):
        assert os.path.isfile(os.path.join(workdir, "export", name)), name
    exported = json.load(open(paths["config"]))
    assert exported["input"]["size"] == [12, 12] and exported["input"]["channel_order"] == "RGB"
    assert exported["step"] == 2 and exported["architecture"] == "swin_moe"
    assert exported["facemoe_jax_version"] == facemoe_jax.__version__
    assert exported["onnx"]["input"]["shape"] == ["batch", 3, 12, 12]
    assert exported["onnx"]["max_abs_diff_vs_pytorch"] <= 1e-4

    images = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    raw = from_workdir.embed(images, flip_test=False, normalize=False)
    assert raw.shape == (5, 8) and raw.dtype == np.float32

    # Flip test as the official TinyFace script: add raw embeddings of image and mirror, normalise.
    mirrored = from_workdir.embed(images[:, :, ::-1], flip_test=False, normalize=False)
    fused = raw + mirrored
    np.testing.assert_allclose(
        from_workdir.embed(images),
        fused / np.linalg.norm(fused, axis=1, keepdims=True),
        rtol=1e-5,
        atol=1e-6,
    )
    # Batching (with a padded tail) does not change the result.
    np.testing.assert_allclose(
        from_workdir.embed(images, batch_size=2, flip_test=False, normalize=False),
        raw,
        rtol=1e-5,
        atol=1e-6,
    )

    from_export = FaceEncoder.from_checkpoint(os.path.join(workdir, "export"))
    np.testing.assert_array_equal(from_export.embed(images, flip_test=False, normalize=False), raw)

    module = torch_models.torch_model_from_config(from_workdir.config.model)
    module.load_state_dict(torch.load(paths["pt"]), strict=True)
    x = torch.from_numpy((images.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), raw, atol=1e-4)

    # The ONNX file (onnxruntime, the same normalised NCHW input) embeds as JAX does.
    from facemoe_jax.interop import onnx as onnx_export

    np.testing.assert_allclose(onnx_export.run_onnx(paths["onnx"], x.numpy()), raw, atol=1e-4)


def test_embed_rejects_wrong_images(tmp_path):
    config = tiny_swin_run_config()
    from facemoe_jax.interop import convert
    from tests.interop.test_convert import random_variables

    _, variables = random_variables(config.model)
    encoder = FaceEncoder(config, variables)
    with pytest.raises(ValueError, match=r"uint8 RGB images of shape \(N, 12, 12, 3\)"):
        encoder.embed(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encoder.embed(np.zeros((2, 12, 12, 3), np.float32))
    convert.save_torch(convert.jax_to_torch(config.model, variables), str(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match="config.json"):
        FaceEncoder.from_checkpoint(str(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match="holds neither"):
        FaceEncoder.from_checkpoint(str(tmp_path))
