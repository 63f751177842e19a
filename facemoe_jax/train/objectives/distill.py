"""Instance-relation distillation from a frozen HR teacher (`config.distill`).

`config.distill.teacher` names an HR model (one of our workdirs, `W/checkpoints/STEP`, a
PyTorch file with its architecture from `config.distill.teacher_config` or the export's
config.json, or an ONNX file); its architecture may differ from the student's. In the step the
teacher embeds `batch["image_hr"]` (the geometry-only image of the paired pipeline, resized on
device when the teacher's input size differs), the student `batch["image"]` (the same record
degraded), and the loss is instance_weight * instance + relation_weight * relation
(losses/distill.py). Both terms are logged whenever a teacher is set, even at weight 0.

The teacher's variables are a frozen input of the step, not part of the TrainState: they need
no optimiser state, checkpoints stay the student's size, and any student checkpoint resumes with
the teacher reloaded at every start. The teacher runs in eval mode on inputs that do not depend
on the student's parameters, behind `stop_gradient`, so none of its activations are kept for
the backward pass.

With `config.distill.teacher_cache` the teacher does not run in the step: its flip-test
embedding of every training record is computed once (train/teacher_cache.py) and the step's
frozen input is that table, indexed by each image's source index (`batch["record"]`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from facemoe_jax.core.config_file import load_config_file
from facemoe_jax.core.images import normalize_images
from facemoe_jax.data.augment import Augmenter
from facemoe_jax.losses import distill as distill_losses
from facemoe_jax.models import build_model
from facemoe_jax.parallel import mesh as mesh_lib
from facemoe_jax.parallel import sharding
from facemoe_jax.train import teacher_cache
from facemoe_jax.train.objectives.base import Objective

PRODUCE_TEACHER = "python -m facemoe_jax.main --config configs/demo.py --workdir runs/demo"
FIELD = "config.distill.teacher"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The static half of the teacher (its variables travel as the step's frozen input)."""

    model: Any
    image_size: int
    embed_dim: int


def teacher_embeddings(teacher: Teacher, variables, image_hr: jax.Array) -> jax.Array:
    """The frozen teacher's float32 embeddings of the HR images, outside autodiff."""
    x = normalize_images(image_hr)
    if x.shape[1:3] != (teacher.image_size, teacher.image_size):
        size = teacher.image_size
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")
    embeddings, _ = teacher.model.apply(variables, x, train=False)
    return jax.lax.stop_gradient(embeddings.astype(jnp.float32))


class DistillObjective(Objective):
    name = "distill"

    @classmethod
    def check_config(cls, config):
        cfg = config.distill
        if cfg.instance_form not in distill_losses.INSTANCE_FORMS:
            raise ValueError(
                f"config.distill.instance_form={cfg.instance_form!r} is not one of "
                f"{distill_losses.INSTANCE_FORMS}"
            )
        if cfg.relation_form not in distill_losses.RELATION_FORMS:
            raise ValueError(
                f"config.distill.relation_form={cfg.relation_form!r} is not one of "
                f"{distill_losses.RELATION_FORMS}"
            )
        for field in ("instance_weight", "relation_weight"):
            if not cfg[field] >= 0:
                raise ValueError(f"config.distill.{field}={cfg[field]} must be >= 0")
        if not cfg.temperature > 0:
            raise ValueError(f"config.distill.temperature={cfg.temperature} must be > 0")
        teacher = str(cfg.teacher)
        if not teacher:
            if (cfg.instance_weight > 0 or cfg.relation_weight > 0) and not cfg.pretrain_teacher:
                raise ValueError(
                    "distillation weights are set but config.distill.teacher is empty: give an "
                    "HR teacher, --config.distill.teacher=WORKDIR (one of our runs) or a PyTorch "
                    f"file (e.g. train one with `{PRODUCE_TEACHER}` and pass "
                    "--config.distill.teacher=runs/demo), or have the run train one first with "
                    "--config.distill.pretrain_teacher=configs/demo.py"
                )
            return
        if not os.path.exists(teacher):
            raise ValueError(f"config.distill.teacher={teacher!r} does not exist")
        if cfg.teacher_cache and config.data.crop_prob > 0:
            raise ValueError(
                f"config.distill.teacher_cache={cfg.teacher_cache!r} keeps one HR target per "
                f"record, but config.data.crop_prob={config.data.crop_prob} crops the HR image "
                "differently at every draw: set crop_prob=0 or teacher_cache=''"
            )
        if not Augmenter(config.data).degrade_steps:
            raise ValueError(
                "config.distill.teacher is set but no degradation is switched on in config.data, "
                "so the student would see the teacher's HR images: set one, e.g. "
                "--config.data.acquisition_prob=1"
            )

    @classmethod
    def active(cls, config):
        return bool(config.distill.teacher)

    def __init__(self, config, resources):
        super().__init__(config)
        cfg = config.distill
        if resources is None or resources.load_variables is None:
            raise ValueError(f"{FIELD} is set, but this run was started without a loader")
        spec = str(cfg.teacher_config)
        loaded = resources.load_variables(
            str(cfg.teacher),
            load_config_file(spec) if spec else None,
            field=FIELD,
            config_hint="name its architecture with --config.distill.teacher_config="
            "configs/FILE.py[:arg]",
        )
        self.origin, teacher_config = loaded.origin, loaded.config
        self.teacher = Teacher(
            model=build_model(teacher_config.model),
            image_size=int(teacher_config.model.image_size),
            embed_dim=int(teacher_config.model.embed_dim),
        )
        self.teacher_name = teacher_config.model.name
        student_dim = int(config.model.embed_dim)
        if cfg.instance_weight > 0 and self.teacher.embed_dim != student_dim:
            raise ValueError(
                f"config.distill.instance_weight={cfg.instance_weight} compares embeddings one to "
                f"one, but the teacher {self.origin} embeds in {self.teacher.embed_dim} "
                f"dimensions and the student (config.model.embed_dim) in {student_dim}; the "
                "relation loss alone works across sizes"
            )
        variables = {
            "params": loaded.variables["params"],
            "batch_stats": loaded.variables.get("batch_stats", {}),
        }
        self.cached = bool(cfg.teacher_cache)
        if self.cached:
            if resources.source is None:
                raise ValueError(
                    f"config.distill.teacher_cache={cfg.teacher_cache!r}: this run was started "
                    "without its training source, so there is nothing to cache"
                )
            model = self.teacher.model
            table = teacher_cache.load_or_build(
                lambda v, x: model.apply(v, x, train=False)[0],
                variables,
                self.teacher.image_size,
                resources.source,
                teacher_cache.cache_dir(str(cfg.teacher_cache)),
                f"the teacher {self.origin}",
            )
            self._frozen = {"table": jax.device_put(table, mesh_lib.replicated(resources.mesh))}
            return
        # Expert weights of an MoE teacher follow the run's sharding rules; the rest is replicated.
        shardings = sharding.state_shardings(variables, resources.mesh, config.sharding_rules)
        self._frozen = jax.tree.map(jax.device_put, variables, shardings)

    @property
    def batch_keys(self):
        return ("record",) if self.cached else ("image_hr",)

    def frozen(self):
        return self._frozen

    def describe(self):
        cfg = self.config.distill
        tau = f", tau {cfg.temperature:g}" if cfg.relation_form == "kl" else ""
        if self.cached:
            how = f"{self.teacher.image_size} px, flip-test embeddings cached per record"
        else:
            size = sum(int(x.size) for x in jax.tree.leaves(self._frozen["params"]))
            how = (
                f"{size / 1e6:.2f}M parameters, {self.teacher.image_size} px, frozen, eval-mode "
                "BatchNorm"
            )
        return (
            f"distillation teacher: {self.origin} ({self.teacher_name}, {how}); instance "
            f"x{cfg.instance_weight:g} ({cfg.instance_form}), relation x{cfg.relation_weight:g} "
            f"({cfg.relation_form}{tau})"
        )

    def loss(self, ctx, params, state, batch, forward, frozen):
        cfg = self.config.distill
        student = forward.embeddings
        if self.cached:
            target = frozen["table"][batch["record"]]
        else:
            target = teacher_embeddings(self.teacher, frozen, batch["image_hr"])
        if target.shape[-1] == student.shape[-1]:
            instance = distill_losses.instance_loss(student, target, cfg.instance_form)
        else:  # logged only when comparable; the constructor refuses a weight on it
            instance = jnp.zeros((), jnp.float32)
        relation = distill_losses.relation_loss(student, target, cfg.relation_form, cfg.temperature)
        total = cfg.instance_weight * instance + cfg.relation_weight * relation
        metrics = {"train/distill_instance": instance, "train/distill_relation": relation}
        return total, metrics, None
