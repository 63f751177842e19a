"""Runs as the command line starts them: the train loop with the services of the layers above
train/ (the one weight loader, the evaluations), and runs of several stages.

A distillation run with `config.distill.pretrain_teacher` first trains its own HR teacher into
WORKDIR/teacher (from that config file, once: WORKDIR/teacher/done.json marks it finished), then
the student with `config.distill.teacher` pointing at it, as big_vision and MaxText give
distillation a driver of its own instead of a branch in the trainer.
"""

from __future__ import annotations

import json
import os

import ml_collections
from etils import epath

from facemoe_jax.core.config_file import load_config_file
from facemoe_jax.evaluate import suite
from facemoe_jax.interop.load import load_variables
from facemoe_jax.train import loop


def default_services() -> loop.Services:
    return loop.Services(load_variables=load_variables, evaluations=suite)


def with_pretrained_teacher(config, workdir: str) -> ml_collections.ConfigDict:
    """`config` with config.distill.teacher = WORKDIR/teacher, trained first from the config
    file config.distill.pretrain_teacher unless done already; unchanged when a teacher is given
    or none is asked for. With config.distill.init_student (and no config.init_from), the
    student also starts from it."""
    cfg = config.distill
    if cfg.teacher or not cfg.pretrain_teacher:
        return config
    teacher_dir = os.path.join(workdir, "teacher")
    done = epath.Path(teacher_dir, "done.json")
    if not done.exists():
        teacher_config = load_config_file(str(cfg.pretrain_teacher))
        print(
            f"distillation: training the teacher {cfg.pretrain_teacher} at HR in {teacher_dir} "
            f"({teacher_config.train.num_steps} steps) first",
            flush=True,
        )
        train_and_evaluate(teacher_config, teacher_dir)
        done.write_text(json.dumps({"config": str(cfg.pretrain_teacher)}))
    config = ml_collections.ConfigDict(config.to_dict())
    config.distill.teacher = teacher_dir
    if cfg.init_student and not config.init_from:
        config.init_from = teacher_dir
    return config


def train_and_evaluate(config, workdir: str, extra_hooks: tuple = ()) -> dict:
    """Trains (continuing from the workdir's latest checkpoint), then evaluates."""
    config = with_pretrained_teacher(config, workdir)
    return loop.train_and_evaluate(config, workdir, default_services(), extra_hooks)


def evaluate_checkpoint(config, workdir: str) -> dict:
    """--mode=eval: the evaluations of the workdir's latest checkpoint (train/loop.py)."""
    return loop.evaluate_checkpoint(config, workdir, default_services())


def run_evaluations(model, variables, config, workdir: str, step: int, writer, outputs="eval"):
    return loop.run_evaluations(suite, model, variables, config, workdir, step, writer, outputs)
