"""Distillation in the train step: the frozen teacher argument, the loss terms, the config
checks, loading a teacher of another architecture, and a run end to end (resumed)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from facemoe_jax.models import build_model
from facemoe_jax.parallel import mesh as mesh_lib
from facemoe_jax.interop.load import load_variables
from facemoe_jax.train import objectives
from facemoe_jax.train.objectives.distill import DistillObjective, teacher_embeddings
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from facemoe_jax.train import step as step_lib
from tests.train.test_init_from import saved_run
from tests.train.test_step import fixed_batch, tiny_config


def teacher_config():
    """Another architecture than the student's: dense, one block, width 16, 32 px input."""
    config = tiny_config()
    config.model.update(moe_layers="none", depth=1, width=16, num_heads=2, image_size=32)
    return config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return saved_run(str(tmp_path_factory.mktemp("teacher")), teacher_config(), 3)


def student_config(teacher_dir, **distill):
    """A dense one-block student (the step's distillation does not depend on the encoder)."""
    config = tiny_config()
    config.model.update(moe_layers="none", depth=1)
    config.distill.update(teacher=teacher_dir, **distill)
    config.data.acquisition_prob = 1.0
    return config


def load_teacher(config, mesh) -> DistillObjective:
    return DistillObjective(config, objectives.Resources(mesh, load_variables))


def test_config_errors_name_the_field(teacher_run):
    config = tiny_config()
    config.distill.instance_weight = 1.0
    with pytest.raises(ValueError, match="config.distill.teacher is empty.*pretrain_teacher"):
        DistillObjective.check_config(config)
    config.distill.teacher = "/nonexistent/run"
    with pytest.raises(ValueError, match="config.distill.teacher='/nonexistent/run'"):
        DistillObjective.check_config(config)
    config.distill.teacher = teacher_run[0]
    with pytest.raises(ValueError, match="data.acquisition_prob=1"):  # the student would see HR
        DistillObjective.check_config(config)
    config = student_config(teacher_run[0], relation_form="cka")
    with pytest.raises(ValueError, match="config.distill.relation_form='cka'"):
        DistillObjective.check_config(config)


def test_teacher_from_a_workdir_of_another_architecture(teacher_run, capsys):
    workdir, _ = teacher_run
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "expert": 1}))
    config = student_config(workdir, relation_weight=1.0)
    objective = load_teacher(config, mesh)
    assert (objective.teacher.image_size, objective.teacher.embed_dim) == (32, 32)
    assert objective.describe().startswith(f"distillation teacher: {workdir} (step 3) (vit_moe")
    config.model.embed_dim = 16  # one-to-one instance loss across sizes: refused
    config.distill.instance_weight = 1.0
    with pytest.raises(ValueError, match="embeds in 32 dimensions.*student.*in 16"):
        load_teacher(config, mesh)


@pytest.mark.slow
def test_step_adds_the_weighted_terms_and_leaves_the_teacher_alone(teacher_run):
    workdir, saved = teacher_run
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "expert": 1}))
    batch = fixed_batch()
    batch["image_hr"] = jnp.asarray(np.asarray(batch["image"])[:, ::-1])  # another image

    def one_step(instance_weight, relation_weight, with_teacher=True):
        config = student_config(
            workdir, instance_weight=instance_weight, relation_weight=relation_weight
        )
        model = build_model(config.model)
        tx, schedule = optimizer_lib.build_optimizer(config.optimizer, 10)
        state = state_lib.create_train_state(model, tx, config)
        if not with_teacher:
            config.distill.teacher = ""
        active = objectives.build(config, objectives.Resources(mesh, load_variables))
        frozen = objectives.frozen_inputs(active)
        step = jax.jit(step_lib.make_train_step(model, config, tx, schedule, active))
        new_state, metrics = step(state, batch, frozen)
        return new_state, metrics, frozen.get("distill")

    plain, plain_metrics, _ = one_step(0.0, 0.0, with_teacher=False)
    logged, logged_metrics, variables = one_step(0.0, 0.0)
    # Weight 0: the terms are logged, the update is the plain one.
    assert {"train/distill_instance", "train/distill_relation"} <= set(logged_metrics)
    assert "train/distill_instance" not in plain_metrics
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        logged.params,
        plain.params,
    )
    # The teacher's variables are an argument, not state: untouched by the step.
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(variables["params"]), saved.params["encoder"]
    )
    _, metrics, _ = one_step(2.0, 30.0)
    expected = (
        metrics["train/margin_ce"]
        + 2.0 * metrics["train/distill_instance"]
        + 30.0 * metrics["train/distill_relation"]
    )  # dense student: no router losses
    np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-6)
    assert float(metrics["train/distill_instance"]) > 0.05


@pytest.mark.slow
def test_run_end_to_end_with_paired_data_and_resume(teacher_run, tmp_path, capsys):
    from facemoe_jax.pipelines import train_and_evaluate

    config = student_config(teacher_run[0], instance_weight=1.0, relation_weight=10.0)
    config.data.update(train="synthetic_lr_hr", num_classes=8, synthetic_images_per_identity=4)
    config.train.update(num_steps=2, batch_size=8, log_every_steps=1)
    config.checkpoint.every_steps = 1
    config.eval.update(synthetic_pairs=0, synthetic_tinyface_identities=0, routing_map_faces=0)
    train_and_evaluate(config, str(tmp_path))
    config.train.num_steps = 3
    train_and_evaluate(config, str(tmp_path))  # resumes: the teacher is loaded again
    out = capsys.readouterr().out
    assert out.count("distillation teacher:") == 2 and "resumed from checkpoint at step 2" in out
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert all(m["train/distill_relation"] > 0 for m in logged)


def test_teacher_from_an_onnx_file(tmp_path, capsys):
    pytest.importorskip("onnx")
    from tests.export.test_onnx_finetune import small_face_graph

    path = small_face_graph(tmp_path / "teacher.onnx")
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "expert": 1}))
    config = student_config(path, relation_weight=1.0)
    objective = load_teacher(config, mesh)
    teacher = objective.teacher
    assert (teacher.image_size, teacher.embed_dim) == (16, 16)  # read from the graph
    assert objective.describe().startswith(f"distillation teacher: {path} (onnx")
    images = jnp.zeros((2, 32, 32, 3), jnp.float32)  # the student's size: resized for it
    assert teacher_embeddings(teacher, objective.frozen(), images).shape == (2, 16)
