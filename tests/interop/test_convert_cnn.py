"""insightface CNNs (IResNet, MobileFaceNet): our exports are arcface_torch state_dicts.

The official key lists (tests/interop/data/insightface_*_state_dict.tsv: name, shape, dtype, kind)
were written by instantiating deepinsight/insightface recognition/arcface_torch/backbones
(iresnet.py, mobilefacenet.py; FaceMoE's backbones/ copies are identical) on the meta device;
the official code is not in this repository, so a clean clone checks our export's names and
shapes against those lists and its numbers against our PyTorch twin (interop/torch_cnn.py), whose
state_dict is the official one entry for entry, in order.

Random JAX variables with non-trivial BatchNorm statistics and PReLU slopes are exported, loaded
with strict=True into the twin, and both frameworks embed the same images in eval mode; the
reverse import is bit-exact; an insightface-style `backbone.pth` embeds through FaceEncoder.
"""

import os

import jax
import numpy as np
import pytest
import torch

from configs import common
from facemoe_jax import FaceEncoder
from facemoe_jax.interop import convert, torch_cnn, torch_models
from facemoe_jax.models import build_model
from tests.interop.test_convert import images, load_strict, random_variables, torch_embed

DATA = os.path.join(os.path.dirname(__file__), "data")


def cnn_config(name="iresnet", **overrides):
    cfg = common.get_base_config().model
    cfg.update(name=name, embed_dim=512, image_size=112, depth=50)
    cfg.update(**overrides)
    return cfg


def official(arch):
    """{name: (shape, dtype, kind)} in the official state_dict order."""
    lines = open(os.path.join(DATA, f"insightface_{arch}_state_dict.tsv")).read().splitlines()
    assert lines[0].split("\t") == ["name", "shape", "dtype", "kind"]
    out = {}
    for line in lines[1:]:
        name, shape, dtype, kind = line.split("\t")
        out[name] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype, kind)
    return out


OFFICIAL_CASES = {
    # arch: (config overrides, official state_dict entries)
    "iresnet18": (dict(depth=18), 187),
    "iresnet50": (dict(depth=50), 475),
    "iresnet100": (dict(depth=100), 925),
    "mbf": (dict(name="mobilefacenet"), 333),
    "mbf_large": (
        dict(name="mobilefacenet", mobilefacenet_blocks=(2, 8, 12, 4), mobilefacenet_scale=4),
        606,
    ),
}


@pytest.mark.parametrize("arch", list(OFFICIAL_CASES))
def test_export_has_the_official_names_shapes_and_order(arch):
    overrides, count = OFFICIAL_CASES[arch]
    cfg = cnn_config(**overrides)
    reference = official(arch)
    assert len(reference) == count
    ours = {k: tuple(v) for k, v in convert.torch_state_dict_shapes(cfg).items()}
    assert set(ours) ^ set(reference) == set()
    assert ours == {k: v[0] for k, v in reference.items()}
    with torch.device("meta"):
        twin = torch_models.torch_model_from_config(cfg)
    state = twin.state_dict()
    assert list(state) == list(reference)  # same entries in the same order
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: v[0] for k, v in reference.items()}
    assert {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()} == {
        k: v[1] for k, v in reference.items()
    }
    params = {k for k, _ in twin.named_parameters()}
    assert params == {k for k, v in reference.items() if v[2] == "param"}


@pytest.mark.slow
def test_iresnet200_export_has_the_official_names_and_shapes():
    reference = official("iresnet200")
    assert len(reference) == 1807
    ours = {k: tuple(v) for k, v in convert.torch_state_dict_shapes(cnn_config(depth=200)).items()}
    assert ours == {k: v[0] for k, v in reference.items()}


def check_parity_and_round_trip(cfg, n=3, tolerance=1e-4):
    """JAX export -> twin (strict) embeds as JAX; twin state -> JAX -> torch is bit-exact."""
    model, variables = random_variables(cfg)
    x = images(cfg, n=n)
    expected, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    expected = np.asarray(expected)
    assert aux == {}
    assert expected.std(axis=0).mean() > 0.01 * np.abs(expected).max()  # depends on the image
    state = convert.jax_to_torch(cfg, variables, num_batches_tracked=3)
    module = load_strict(cfg, state)
    got = torch_embed(module, x)
    diff = np.abs(got - expected).max()
    scale = np.abs(expected).max()
    print(f"{cfg.name} {cfg.image_size}px: max abs diff {diff:.2e} (max |embedding| {scale:.2f})")
    assert diff <= tolerance * max(scale, 1.0), (diff, scale)

    twin_state = torch_models.numpy_state_dict(module)
    back = convert.jax_to_torch(cfg, convert.torch_to_jax(cfg, twin_state), num_batches_tracked=3)
    assert back.keys() == twin_state.keys()
    for name, value in twin_state.items():
        assert back[name].dtype == value.dtype, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    return module, variables


@pytest.mark.parametrize(
    "cfg",
    [
        cnn_config(depth=18, image_size=16, embed_dim=32),  # 1x1 last map
        cnn_config(depth=18, image_size=40, embed_dim=32, dropout=0.4),  # 3x3: flatten order
        cnn_config(name="mobilefacenet", image_size=32, embed_dim=64),  # 2x2 GDC
        cnn_config(
            name="mobilefacenet",
            image_size=32,
            embed_dim=64,
            mobilefacenet_blocks=(2, 1, 1, 1),  # a Residual as layers.1 (the large layout)
            mobilefacenet_scale=1,
        ),
    ],
    ids=["r18_16px", "r18_40px_dropout", "mbf_32px", "mbf_residual_first"],
)
def test_export_embeds_as_jax_in_the_twin_and_round_trips_bit_exactly(cfg):
    check_parity_and_round_trip(cfg)


def test_mobilefacenet_at_112_embeds_as_jax():
    check_parity_and_round_trip(cnn_config(name="mobilefacenet"), n=2)


def test_iresnet50_at_112_embeds_as_jax():  # the acceptance model, full size (~10-15 s)
    check_parity_and_round_trip(cnn_config(depth=50), n=2)


def test_insightface_checkpoint_embeds_through_face_encoder(tmp_path):
    """A `backbone.pth` as arcface_torch saves it (DDP `module.` prefix, trained-looking BN
    statistics, PReLU slopes, num_batches_tracked) embeds as the twin it came from."""
    cfg = cnn_config(name="mobilefacenet", image_size=32, embed_dim=64)
    twin = torch_cnn.torch_cnn_from_config(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.1, 0.4)
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1234)
    torch.save({f"module.{k}": v for k, v in twin.state_dict().items()}, tmp_path / "backbone.pth")

    config = common.get_base_config()
    config.model = cfg
    encoder = FaceEncoder.from_checkpoint(str(tmp_path / "backbone.pth"), config=config)
    faces = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    got = encoder.embed(faces, flip_test=False, normalize=False)
    expected = torch_embed(twin, faces.astype(np.float32) / 127.5 - 1.0)
    diff = np.abs(got - expected).max()
    assert diff <= 1e-4 * np.abs(expected).max(), diff
    # Flip test and L2 normalisation on top, as for every encoder.
    unit = encoder.embed(faces)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)

    # The reverse import of that checkpoint is bit-exact, counter included.
    state, _ = convert.load_state_dict_file(str(tmp_path / "backbone.pth"))
    back = convert.jax_to_torch(cfg, encoder.variables, num_batches_tracked=1234)
    assert back.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_import_errors_name_the_entry():
    cfg = cnn_config(depth=18, image_size=16, embed_dim=32)
    _, variables = random_variables(cfg)
    state = convert.jax_to_torch(cfg, variables)
    assert np.array_equal(state["features.weight"], np.ones(32, np.float32))
    assert "layer2.0.downsample.1.num_batches_tracked" in state
    with pytest.raises(ValueError, match="'layer3.1.prelu.weight'"):
        convert.torch_to_jax(cfg, {k: v for k, v in state.items() if k != "layer3.1.prelu.weight"})
    with pytest.raises(ValueError, match="features.weight.*constant"):
        convert.torch_to_jax(cfg, dict(state, **{"features.weight": np.full(32, 2, np.float32)}))
    with pytest.raises(ValueError, match="fc.weight.*shape"):  # a 112 px checkpoint, 16 px config
        convert.torch_to_jax(cfg, dict(state, **{"fc.weight": np.zeros((32, 25088), np.float32)}))
    with pytest.raises(ValueError, match="layer1.0.extra.weight"):
        convert.torch_to_jax(cfg, dict(state, **{"layer1.0.extra.weight": np.zeros(3)}))


def test_init_from_an_arcface_torch_training_checkpoint(tmp_path):
    """config.init_from = arcface_torch's checkpoint_gpu_0.pt (backbone + Partial FC centres):
    the train state starts from those weights and statistics, class centres included."""
    from facemoe_jax.train import optimizer as optimizer_lib
    from facemoe_jax.train import state as state_lib

    config = common.get_base_config()
    config.model = cnn_config(name="mobilefacenet", image_size=32, embed_dim=64)
    config.data.num_classes = 10
    config.loss.class_rows_multiple = 1
    _, variables = random_variables(config.model, seed=3)
    state_dict = convert.jax_to_torch(config.model, variables, num_batches_tracked=9)
    centers = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    torch.save(
        {
            "epoch": 1,
            "state_dict_backbone": {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()},
            "state_dict_softmax_fc": {"weight": torch.from_numpy(centers)},
        },
        tmp_path / "checkpoint_gpu_0.pt",
    )
    config.init_from = str(tmp_path / "checkpoint_gpu_0.pt")
    config.init_classifier = True
    model = build_model(config.model)
    tx, _ = optimizer_lib.build_optimizer(config.optimizer, 10)
    from facemoe_jax.interop.load import load_variables
    from facemoe_jax.train.init_from import initialize_from

    state = initialize_from(state_lib.create_train_state(model, tx, config), config, load_variables)
    for got, want in zip(
        jax.tree.leaves((state.params["encoder"], state.batch_stats)),
        jax.tree.leaves((variables["params"], variables["batch_stats"])),
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(state.params["classifier"]["centers"]), centers)
