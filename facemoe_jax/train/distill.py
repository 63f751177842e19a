"""Instance-relation distillation inside the train step: the frozen teacher and its loss terms.

`config.distill.teacher` names an HR model (one of our workdirs, `W/checkpoints/STEP`, or a
PyTorch file with its architecture from `config.distill.teacher_config` or the export's
config.json); its architecture may differ from the student's. In the jitted step the teacher
embeds `batch["image_hr"]` (the geometry-only image of the paired pipeline, resized on device
when the teacher's input size differs), the student `batch["image"]` (the same record degraded:
`data/augment.py`, paired mode), and

  total = margin loss (+ router losses) + instance_weight * instance + relation_weight * relation

with the forms of `losses/distill.py`. Both terms are logged (`train/distill_instance`,
`train/distill_relation`) whenever a teacher is set, even at weight 0, so a run without
distillation shows how far it drifts from the teacher.

Design: the teacher's variables are a separate argument of the jitted step, not part of the
TrainState. They are frozen, so they need no optimiser state and nothing in a checkpoint would
change; keeping them out keeps checkpoints the student's size and lets any student checkpoint
resume with the teacher reloaded from `config.distill.teacher` at every start. The teacher runs
in eval mode (running BatchNorm statistics, no dropout) on inputs that do not depend on the
student's parameters, and its output passes `stop_gradient`: autodiff never linearises it, so
none of its activations are kept for the backward pass, and XLA computes it once per step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from facemoe_jax.core.images import normalize_images
from facemoe_jax.losses import distill as distill_losses

PRODUCE_TEACHER = "python -m facemoe_jax.main --config configs/demo.py --workdir runs/demo"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The static half of the teacher (its variables travel as the step's argument)."""

    model: Any
    image_size: int
    embed_dim: int
    settings: ml_collections.ConfigDict  # config.distill


def _settings(config) -> ml_collections.ConfigDict | None:
    return config.get("distill")


def check_config(config) -> None:
    """Errors a user can fix, before anything is loaded or written."""
    cfg = _settings(config)
    if cfg is None:
        return
    if cfg.instance_form not in distill_losses.INSTANCE_FORMS:
        raise ValueError(f"config.distill.instance_form={cfg.instance_form!r} is not one of "
                         f"{distill_losses.INSTANCE_FORMS}")  # fmt: skip
    if cfg.relation_form not in distill_losses.RELATION_FORMS:
        raise ValueError(f"config.distill.relation_form={cfg.relation_form!r} is not one of "
                         f"{distill_losses.RELATION_FORMS}")  # fmt: skip
    for field in ("instance_weight", "relation_weight"):
        if not cfg[field] >= 0:
            raise ValueError(f"config.distill.{field}={cfg[field]} must be >= 0")
    if not cfg.temperature > 0:
        raise ValueError(f"config.distill.temperature={cfg.temperature} must be > 0")
    teacher = str(cfg.teacher)
    if not teacher:
        if (cfg.instance_weight > 0 or cfg.relation_weight > 0) and not cfg.get("pretrain_teacher"):
            raise ValueError(
                "distillation weights are set but config.distill.teacher is empty: give an HR "
                "teacher, --config.distill.teacher=WORKDIR (one of our runs) or a PyTorch file "
                f"(e.g. train one with `{PRODUCE_TEACHER}` and pass "
                "--config.distill.teacher=runs/demo), or have the run train one first with "
                "--config.distill.pretrain_teacher=configs/demo.py"
            )
        return
    if not os.path.exists(teacher):
        raise ValueError(f"config.distill.teacher={teacher!r} does not exist")
    from facemoe_jax.data.augment import Augmenter

    if not Augmenter(config.data).degrade_steps:
        raise ValueError(
            "config.distill.teacher is set but no degradation is switched on in config.data, so "
            "the student would see the teacher's HR images: set one, e.g. "
            "--config.data.acquisition_prob=1"
        )


def with_pretrained_teacher(config, workdir: str) -> ml_collections.ConfigDict:
    """`config` with config.distill.teacher = WORKDIR/teacher, trained first from the config
    file config.distill.pretrain_teacher unless done already; unchanged when a teacher is given
    or none is asked for. With config.distill.init_student (and no config.init_from), the
    student also starts from it."""
    cfg = _settings(config)
    if cfg is None or cfg.teacher or not cfg.get("pretrain_teacher"):
        return config
    import json

    from etils import epath

    teacher_dir = os.path.join(workdir, "teacher")
    done = epath.Path(teacher_dir, "done.json")
    if not done.exists():
        from facemoe_jax.train.loop import train_and_evaluate

        teacher_config = load_config_file(str(cfg.pretrain_teacher))
        print(f"distillation: training the teacher {cfg.pretrain_teacher} at HR in {teacher_dir} "
              f"({teacher_config.train.num_steps} steps) first", flush=True)  # fmt: skip
        train_and_evaluate(teacher_config, teacher_dir)
        done.write_text(json.dumps({"config": str(cfg.pretrain_teacher)}))
    config = ml_collections.ConfigDict(config.to_dict())
    config.distill.teacher = teacher_dir
    if cfg.get("init_student") and not config.get("init_from"):
        config.init_from = teacher_dir
    return config


def enabled(config) -> bool:
    cfg = _settings(config)
    return cfg is not None and bool(cfg.teacher)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """A config file "path.py[:arg]" -> get_config(arg)."""
    path, _, arg = spec.partition(":")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(path) and os.path.isfile(os.path.join(root, path)):
        path = os.path.join(root, path)  # configs/... from the project root
    if not os.path.isfile(path):
        raise ValueError(f"config file {spec!r} (config.distill): {path!r} is not a file")
    if root not in sys.path:
        sys.path.insert(0, root)  # config files import configs.common
    module_spec = importlib.util.spec_from_file_location("distill_teacher_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _teacher_variables(config):
    """(origin, teacher config, {"params", "batch_stats"}) of config.distill.teacher."""
    from facemoe_jax.train.init_from import is_run_directory, split_run_path

    path = str(config.distill.teacher)
    if is_run_directory(path):
        from facemoe_jax.train.checkpoint import restore_params

        workdir, step = split_run_path(path)
        teacher_config, params, batch_stats, step = restore_params(workdir, step)
        return f"{path} (step {step})", teacher_config, {
            "params": params["encoder"], "batch_stats": batch_stats}  # fmt: skip
    from facemoe_jax.encoder import EXPORT_CONFIG, read_export_config
    from facemoe_jax.export import convert

    spec = str(config.distill.get("teacher_config", ""))
    if path.endswith(".onnx"):  # the graph is the architecture; a config only for its input
        from facemoe_jax.encoder import load_onnx

        teacher_config, variables = load_onnx(path, load_config_file(spec) if spec else None)
        return path, teacher_config, variables
    if spec:
        teacher_config = load_config_file(spec)
    else:
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), EXPORT_CONFIG)
        if not os.path.isfile(beside):
            raise ValueError(
                f"config.distill.teacher={path!r} is a file without an export {EXPORT_CONFIG} "
                "beside it: name its architecture with --config.distill.teacher_config="
                "configs/FILE.py[:arg]"
            )
        teacher_config = read_export_config(beside)
    state, _ = convert.load_state_dict_file(path)
    return path, teacher_config, convert.torch_to_jax(teacher_config.model, state)


def load_teacher(config, mesh):
    """(Teacher, variables placed on `mesh`) for config.distill.teacher, or (None, None)."""
    if not enabled(config):
        return None, None
    from facemoe_jax.models import build_model
    from facemoe_jax.parallel import sharding

    origin, teacher_config, variables = _teacher_variables(config)
    cfg = config.distill
    teacher = Teacher(
        model=build_model(teacher_config.model),
        image_size=int(teacher_config.model.image_size),
        embed_dim=int(teacher_config.model.embed_dim),
        settings=cfg,
    )
    student_dim = int(config.model.embed_dim)
    if cfg.instance_weight > 0 and teacher.embed_dim != student_dim:
        raise ValueError(
            f"config.distill.instance_weight={cfg.instance_weight} compares embeddings one to "
            f"one, but the teacher {origin} embeds in {teacher.embed_dim} dimensions and the "
            f"student (config.model.embed_dim) in {student_dim}; the relation loss alone works "
            "across sizes"
        )
    # Expert weights of an MoE teacher follow the run's sharding rules; the rest is replicated.
    shardings = sharding.state_shardings(variables, mesh, config.sharding_rules)
    variables = jax.tree.map(jax.device_put, variables, shardings)
    size = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
    print(
        f"distillation teacher: {origin} ({teacher_config.model.name}, {size / 1e6:.2f}M "
        f"parameters, {teacher.image_size} px, frozen, eval-mode BatchNorm); instance "
        f"x{cfg.instance_weight:g} ({cfg.instance_form}), relation x{cfg.relation_weight:g} "
        f"({cfg.relation_form}{f', tau {cfg.temperature:g}' if cfg.relation_form == 'kl' else ''})",
        flush=True,
    )
    return teacher, variables


def teacher_embeddings(teacher: Teacher, variables, image_hr: jax.Array) -> jax.Array:
    """The frozen teacher's float32 embeddings of the HR images, outside autodiff."""
    x = normalize_images(image_hr)
    if x.shape[1:3] != (teacher.image_size, teacher.image_size):
        x = jax.image.resize(x, (x.shape[0], teacher.image_size, teacher.image_size, x.shape[3]),
                             "bilinear")  # fmt: skip
    embeddings, _ = teacher.model.apply(variables, x, train=False)
    return jax.lax.stop_gradient(embeddings.astype(jnp.float32))


def loss_terms(teacher: Teacher | None, variables, batch: dict, student: jax.Array):
    """(weighted distillation loss, metrics) for the step; (0, {}) without a teacher."""
    if teacher is None:
        return 0.0, {}
    if "image_hr" not in batch:
        raise ValueError("distillation needs batch['image_hr']: the pipeline's paired mode")
    cfg = teacher.settings
    target = teacher_embeddings(teacher, variables, batch["image_hr"])
    if target.shape[-1] == student.shape[-1]:
        instance = distill_losses.instance_loss(student, target, cfg.instance_form)
    else:  # logged only when comparable; check_config refuses a weight on it
        instance = jnp.zeros((), jnp.float32)
    relation = distill_losses.relation_loss(student, target, cfg.relation_form, cfg.temperature)
    total = cfg.instance_weight * instance + cfg.relation_weight * relation
    return total, {"train/distill_instance": instance, "train/distill_relation": relation}
