"""load_variables: every form a model comes in, for each of its users' settings."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import common
from facemoe_jax.interop import convert, load
from facemoe_jax.interop.load import load_variables
from tests.interop.test_convert import random_variables, tiny_vit_config


def same(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ViT-MoE saved as our export writes it: model.pt, model.safetensors, config.json."""
    folder = tmp_path_factory.mktemp("export")
    cfg = tiny_vit_config()
    _, variables = random_variables(cfg)
    state = convert.jax_to_torch(cfg, variables)
    convert.save_torch(state, str(folder / "model.pt"))
    convert.save_safetensors(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": json.loads(cfg.to_json())}))
    return folder, cfg, variables


def test_a_pytorch_file_an_export_folder_and_the_config_beside(exported, tmp_path):
    folder, cfg, variables = exported
    config = common.get_base_config()
    config.model = cfg
    given = load_variables(str(folder / "model.pt"), config)
    assert given.origin == str(folder / "model.pt") and given.config is config
    assert given.step is None and given.class_centers is None
    same(given.variables, variables)
    for path in (folder, folder / "model.safetensors"):  # the architecture from config.json
        found = load_variables(str(path))
        assert found.config.model.name == "vit_moe" and found.config.model.embed_dim == 8
        same(found.variables, variables)

    alone = tmp_path / "model.pt"
    alone.write_bytes((folder / "model.pt").read_bytes())
    with pytest.raises(
        ValueError,
        match=r"config.distill.teacher='.*model.pt' is a file without an export config.json "
        r"beside it: name it",
    ):
        load_variables(str(alone), field="config.distill.teacher", config_hint="name it")
    with pytest.raises(ValueError, match=r"config.init_from='/nonexistent' does not exist"):
        load_variables("/nonexistent")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds neither checkpoints/ nor"):
        load_variables(str(tmp_path / "empty"))


def test_upcycling_and_an_adapter_model_from_a_file_without_adapters(exported):
    folder, cfg, variables = exported
    config = common.get_base_config()
    config.model = tiny_vit_config(moe_layers="all")  # experts where the file has a dense MLP
    with pytest.raises(ValueError, match="checkpoint has no"):
        load_variables(str(folder / "model.pt"), config)
    a, b = (load_variables(str(folder / "model.pt"), config, upcycle=True, seed=s) for s in (1, 1))
    same(a.variables, b.variables)  # the routers' draws follow the seed

    config.model = tiny_vit_config()
    config.model.lora.update(rank=2, where="qkv")
    with pytest.raises(ValueError, match="checkpoint has no"):
        load_variables(str(folder / "model.pt"), config)
    loaded = load_variables(str(folder / "model.pt"), config, lora_optional=True)
    same(loaded.variables, variables)  # the model without adapters
    assert loaded.config.model.lora.rank == 2  # the caller's config is left as it is


def test_a_run_directory_gives_its_step_and_real_class_centres(exported, tmp_path, monkeypatch):
    _, cfg, variables = exported
    saved = common.get_base_config()
    saved.model = cfg
    saved.data.num_classes = 3
    centers = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)  # padded to 4 rows
    calls = []

    def restore(workdir, step=None):
        calls.append((workdir, step))
        params = {"encoder": variables["params"], "classifier": {"centers": centers}}
        return saved, params, variables["batch_stats"], 7 if step is None else step

    monkeypatch.setattr(load, "restore_params", restore)
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints" / "5")
    loaded = load_variables(str(run))
    assert loaded.origin == f"{run} (step 7)" and loaded.step == 7 and loaded.config is saved
    np.testing.assert_array_equal(loaded.class_centers, centers[:3])
    same(loaded.variables, variables)
    assert load_variables(str(run / "checkpoints")).step == 7
    step5 = run / "checkpoints" / "5"
    assert load_variables(str(step5)).origin == f"{step5} (step 5)"
    assert calls == [(str(run), None)] * 2 + [(str(run), 5)]
    os.makedirs(run / "checkpoints" / "best")
    with pytest.raises(ValueError, match=r"config.distill.teacher=.*'best' is not a checkpoint"):
        load_variables(str(run / "checkpoints" / "best"), field="config.distill.teacher")


def test_an_onnx_file_as_its_own_model_and_as_a_state_dict(tmp_path):
    pytest.importorskip("onnxruntime")
    from tests.export.test_onnx_finetune import small_face_graph

    path = small_face_graph(tmp_path / "model.onnx")
    loaded = load_variables(path)
    assert loaded.config.model.name == "onnx" and loaded.config.model.onnx_path == path
    config = ml_collections.ConfigDict({"model": {"name": "onnx", "onnx_channel_order": "BGR"}})
    assert load_variables(path, config).config.model.onnx_channel_order == "BGR"
    assert load_variables(path, config).config.model.embed_dim == 16
