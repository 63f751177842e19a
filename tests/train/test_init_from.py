"""config.init_from = one of our runs: merge by path, upcycling, new/unused lists, shape errors."""

import jax
import numpy as np
import pytest

from facemoe_jax.models import build_model
from facemoe_jax.train import checkpoint as checkpoint_lib
from facemoe_jax.interop.load import load_variables
from facemoe_jax.train import init_from
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from tests.train.test_step import tiny_config


def fresh_state(config):
    model = build_model(config.model)
    tx, _ = optimizer_lib.build_optimizer(config.optimizer, 10, config.train.trainable)
    return state_lib.create_train_state(model, tx, config)


def saved_run(workdir: str, config, step: int):
    """A workdir holding a fresh state of `config` checkpointed at `step`: (workdir, host state)."""
    state = fresh_state(config)
    checkpointer = checkpoint_lib.Checkpointer(workdir, every_steps=1, max_to_keep=1)
    checkpointer.save(step, state, None, config)
    checkpointer.wait()
    checkpointer.close()
    return workdir, jax.device_get(state)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A saved run of a dense 3-block ViT (the HR pre-training of the upcycling row)."""
    workdir = str(tmp_path_factory.mktemp("dense"))
    config = tiny_config()
    config.model.update(moe_layers="none", depth=3)
    config.seed = 7
    return saved_run(workdir, config, 5)


def target_config(source_dir, **model):
    config = tiny_config()
    config.model.update(moe_layers="1", depth=2, **model)  # block 1 becomes an MoE
    config.init_from = source_dir
    return config


def test_upcycled_moe_from_a_dense_workdir_lists_new_and_unused(dense_run, capsys):
    workdir, source = dense_run
    config = target_config(workdir)
    fresh = fresh_state(config)
    state = init_from.initialize_from(fresh, config, load_variables)
    line = capsys.readouterr().out
    assert f"initialised from {workdir} (step 5)" in line
    assert "upcycled from dense MLPs: blocks_1/moe/experts/fc1_bias" in line
    assert "new (from their initialisers): blocks_1/moe/router/gate/kernel (1)" in line
    assert "unused from the source: blocks_2/attn/proj/bias" in line  # depth 3 -> 2
    assert "fresh classifier" in line
    enc, src = state.params["encoder"], source.params["encoder"]
    np.testing.assert_array_equal(
        enc["blocks_0"]["attn"]["qkv"]["kernel"], src["blocks_0"]["attn"]["qkv"]["kernel"]
    )
    for e in range(config.model.num_experts):  # every expert starts as the dense MLP
        np.testing.assert_array_equal(
            enc["blocks_1"]["moe"]["experts"]["fc1_kernel"][e],
            src["blocks_1"]["mlp"]["fc1"]["kernel"],
        )
        np.testing.assert_array_equal(
            enc["blocks_1"]["moe"]["experts"]["fc2_bias"][e], src["blocks_1"]["mlp"]["fc2"]["bias"]
        )
    np.testing.assert_array_equal(
        enc["blocks_1"]["moe"]["router"]["gate"]["kernel"],
        fresh.params["encoder"]["blocks_1"]["moe"]["router"]["gate"]["kernel"],
    )
    np.testing.assert_array_equal(
        state.batch_stats["feature_bn1"]["mean"], source.batch_stats["feature_bn1"]["mean"]
    )
    # Without init_classifier the centres stay fresh even though the class count matches.
    np.testing.assert_array_equal(
        state.params["classifier"]["centers"], fresh.params["classifier"]["centers"]
    )


def test_class_centres_come_along_when_asked_and_the_count_matches(dense_run, capsys):
    workdir, source = dense_run
    config = target_config(workdir + "/checkpoints/5")
    config.init_classifier = True
    state = init_from.initialize_from(fresh_state(config), config, load_variables)
    assert "class centres loaded (8 classes)" in capsys.readouterr().out
    np.testing.assert_array_equal(
        state.params["classifier"]["centers"], source.params["classifier"]["centers"]
    )
    config = target_config(workdir)
    config.init_classifier = True
    config.data.num_classes = 5
    init_from.initialize_from(fresh_state(config), config, load_variables)
    assert "fresh classifier (source has 8 classes x 32, this run 5 x 32)" in (
        capsys.readouterr().out
    )


def test_a_shape_mismatch_names_the_parameter_and_both_shapes(dense_run):
    workdir, _ = dense_run
    config = target_config(workdir, mlp_ratio=4.0)
    with pytest.raises(ValueError) as error:
        init_from.initialize_from(fresh_state(config), config, load_variables)
    message = str(error.value)
    assert "\n" not in message
    assert "blocks_0/mlp/fc1/bias has shape (64,) there but (128,) in this model" in message


def test_missing_paths_and_steps_are_clear_errors(dense_run, tmp_path):
    workdir, _ = dense_run
    config = target_config(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="does not exist"):
        init_from.initialize_from(None, config, load_variables)
    with pytest.raises(ValueError, match=r"no checkpoint at step 9 \(steps: \[5\]\)"):
        checkpoint_lib.restore_params(workdir, 9)


def test_a_pytorch_hr_model_without_adapters_starts_a_petalface_run(tmp_path, capsys):
    """PETALface starts from an HR model.pt that has no adapters: its weights fill the frozen
    layers and the adapters keep their initialisers (listed as new)."""
    import torch

    from facemoe_jax.interop import convert
    from tests.interop.test_convert import random_variables
    from tests.interop.test_petalface import petalface_tiny

    cfg = petalface_tiny()
    plain = petalface_tiny()
    plain.lora.rank = 0
    _, hr = random_variables(plain)
    torch.save(
        {k: torch.from_numpy(v.copy()) for k, v in convert.jax_to_torch(plain, hr).items()},
        tmp_path / "model.pt",
    )
    config = tiny_config()
    config.model = cfg
    config.init_from = str(tmp_path / "model.pt")
    state = init_from.initialize_from(fresh_state(config), config, load_variables)
    line = capsys.readouterr().out
    assert "new (from their initialisers): feature_fc/trainable_lora_down/kernel" in line
    qkv = state.params["encoder"]["layers_0"]["blocks_0"]["attn"]["qkv"]
    np.testing.assert_array_equal(
        qkv["kernel"], hr["params"]["layers_0"]["blocks_0"]["attn"]["qkv"]["kernel"]
    )
    assert "trainable_lora_up2" in qkv


def test_an_onnx_file_starts_an_onnx_run_with_its_own_weights(tmp_path, capsys):
    pytest.importorskip("onnx")
    from facemoe_jax.models import onnx_graph
    from tests.export.test_onnx_finetune import small_face_graph

    path = small_face_graph(tmp_path / "face.onnx")
    config = tiny_config()
    config.model.update(name="onnx", onnx_path=path, image_size=16, embed_dim=16)
    model = build_model(config.model)
    optimizer, _ = optimizer_lib.build_optimizer(config.optimizer, 2)
    state = state_lib.init_train_state(model, optimizer, config, jax.random.key(0))
    # Perturb, then init_from the file: every array comes back to the file's values.
    state = state.replace(
        params={**state.params, "encoder": jax.tree.map(lambda p: p + 1.0, state.params["encoder"])}
    )
    config.init_from = path
    state = init_from.initialize_from(state, config, load_variables)
    expected = onnx_graph.onnx_variables(onnx_graph.read_graph(path))
    for name, value in expected["params"].items():
        np.testing.assert_array_equal(np.asarray(state.params["encoder"][name]), value)
    assert f"initialised from {path}: 6/6 encoder arrays" in capsys.readouterr().out
