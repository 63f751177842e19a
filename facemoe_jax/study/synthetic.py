r"""The synthetic suite of the low-resolution adaptation study (`python -m facemoe_jax.study`, the
default suite): an HR model pre-trained here on the embedded synthetic identities, adapted to LR
by every registered row.

  python -m facemoe_jax.study --out runs/study                  # pre-train, then every recipe
  python -m facemoe_jax.study --out runs/study --seeds 3        # mean ± std over 3 seeds
  python -m facemoe_jax.study --out runs/study --pretrained runs/demo   # skip pre-training

Protocol (all on the embedded synthetic identities, nothing downloaded):
  1. pre-training: `--config` (default configs/demo.py) at HR, once (`out/pretrain_moe`); a dense
     twin (`moe_layers="none"`, `out/pretrain_dense`) only when a recipe starts from it;
  2. adaptation: every registered recipe starts from that checkpoint and trains `--steps` steps
     (the same budget and seed for all) on the LR training set `synthetic_lr` (other identities,
     every image captured small: blur, a sensor of 8-16 px, noise, JPEG), with a fresh
     classifier over those identities unless the recipe continues another row's;
  3. evaluation, the same columns for every row: HR verification (held-out pairs at full
     resolution: accuracy, TAR@FAR=1e-3); LR identification (the synthetic TinyFace-like
     protocol: LR probes against an HR gallery with 1,000 distractor identities, rank-1/5/10);
     LR verification with only the probe degraded to 8 and 12 px.
The plot (hr_vs_lr.png) is HR accuracy against LR rank-1, one point per recipe.

Adding a row = registering a `Recipe` here (a name, its start, how it configures the run); the
study's loop does not change. The method set-ups themselves live in `recipes.py`, shared with
the config files, so a study row and `configs/*.py` apply exactly the same recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import ml_collections
from etils import epath

from facemoe_jax import recipes
from facemoe_jax.core.paths import workdir_path
from facemoe_jax.models import quality as quality_lib
from facemoe_jax.study import rows as rows_lib
from facemoe_jax.study import runner
from facemoe_jax.study.rows import DENSE_PRETRAINED, PRETRAINED, Recipe


# What a study row reports, in table order: (results.json entry, metric, column title).
COLUMNS = (
    ("synthetic", "accuracy", "HR verif. acc"),
    ("synthetic", "tar@far=1e-3", "HR TAR@1e-3"),
    ("synthetic_tinyface", "hr_rank1", "HR rank-1"),
    ("synthetic_tinyface", "rank1", "LR rank-1"),
    ("synthetic_tinyface", "rank5", "LR rank-5"),
    ("synthetic_tinyface", "rank10", "LR rank-10"),
    ("synthetic@probe8px", "accuracy", "LR verif. 8 px"),
    ("synthetic@probe12px", "accuracy", "LR verif. 12 px"),
)


PLOT = (
    ("synthetic_tinyface/rank1", "LR identification rank-1 (%)"),
    ("synthetic/accuracy", "HR verification accuracy (%)"),
)


# ---- Configs.


@dataclasses.dataclass(frozen=True)
class StudySettings:
    steps: int = 300  # adaptation steps per row
    learning_rate: float = 5e-4  # peak lr of the adaptation rows (recipes may change it)
    warmup_steps: int = 30
    lr_classes: int = 600  # identities of the LR training set
    lr_images_per_identity: int = 8
    verification_pairs: int = 1000
    tinyface_identities: int = 200
    tinyface_distractors: int = 1000


def evaluation_fields(config: ml_collections.ConfigDict, settings: StudySettings) -> None:
    """The study's columns, identical for every row."""
    config.eval.update(
        synthetic_pairs=settings.verification_pairs,
        low_resolutions="8,12",
        low_resolution_sides="probe",
        low_resolution_sets="synthetic",
        synthetic_tinyface_identities=settings.tinyface_identities,
        synthetic_tinyface_distractors=settings.tinyface_distractors,
        synthetic_tinyface_ranks="1,5,10",
        routing_map_faces=0,
        every_steps=0,
        bin_dir="",
        ijbb_dir="",
        ijbc_dir="",
        tinyface_dir="",
    )


def pretraining_config(base, dense: bool) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    if dense:
        config.model.moe_layers = "none"
    config.eval.update(synthetic_pairs=0, routing_map_faces=0, low_resolution_sets="")
    config.eval.synthetic_tinyface_identities = 0
    return config


def adaptation_config(
    base,
    recipe: Recipe,
    settings: StudySettings,
    seed: int,
    start_dir: str,
    used: dict[str, str] | None = None,
):
    """The pre-training config turned into the LR adaptation run of `recipe` (`used`: the
    workdirs of the rows it `uses`)."""
    config = ml_collections.ConfigDict(base.to_dict())
    config.seed = seed
    config.init_from = start_dir
    config.init_classifier = False
    # The study's own LR set: its size is the classifier's, so the config needs no resolving
    # (sources.with_data_counts) before trainable_share builds a state from it.
    config.data.update(
        train="synthetic_lr",
        num_classes=settings.lr_classes,
        num_images=0,
        synthetic_images_per_identity=settings.lr_images_per_identity,
    )
    config.train.update(num_steps=settings.steps, log_every_steps=max(settings.steps // 3, 1))
    config.optimizer.update(
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        end_learning_rate=0.0,
    )
    config.checkpoint.update(every_steps=settings.steps, max_to_keep=1)
    if recipe.start == DENSE_PRETRAINED:
        config.model.moe_layers = base.model.moe_layers
    if recipe.uses:
        missing = sorted(set(recipe.uses) - set(used or {}))
        if missing:
            raise ValueError(f"study row {recipe.name!r} needs the runs of {missing}")
        recipe.configure(config, {name: used[name] for name in recipe.uses})
    else:
        recipe.configure(config)
    evaluation_fields(config, settings)
    return config


# ---- The starts: pre-training.


def ensure_pretrained(base, out: str, dense: bool, given: str | None) -> str:
    """The pre-training workdir (trained now unless already there, or `given`)."""
    if given and not dense:
        from facemoe_jax.train.checkpoint import restore_params

        restore_params(given)  # fails now, naming the path, if it holds no checkpoint
        return str(workdir_path(given))
    workdir = os.path.join(out, "pretrain_dense" if dense else "pretrain_moe")
    config = pretraining_config(base, dense)
    done = runner.read_json(os.path.join(workdir, "done.json"))
    key = runner.fingerprint(runner.settings_changed(config))
    if done and done.get("fingerprint") == key:
        return workdir
    runner.prepare_run_dir(workdir, key)
    from facemoe_jax.pipelines import train_and_evaluate

    print(
        f"[study] pre-training the {'dense' if dense else 'MoE'} HR model in {workdir} "
        f"({config.train.num_steps} steps)",
        flush=True,
    )
    t0 = time.perf_counter()
    train_and_evaluate(config, workdir)
    with epath.Path(workdir, "done.json").open("w") as f:
        json.dump({"fingerprint": key, "seconds": time.perf_counter() - t0}, f)
    return workdir


def _starts(base, out, rows, pretrained, settings) -> dict:
    del settings
    starts = {PRETRAINED: ensure_pretrained(base, out, dense=False, given=pretrained)}
    if any(r.start == DENSE_PRETRAINED for r in rows):
        starts[DENSE_PRETRAINED] = ensure_pretrained(base, out, dense=True, given=None)
    return starts


# ---- The recipes of the low-resolution adaptation issue.

RECIPES: dict[str, Recipe] = {}
register = functools.partial(rows_lib.register, registry=RECIPES)


def _classifier_only(config):
    # FaceMoE stage 1 (train_fc.py): only a new classifier trains; the backbone runs in train
    # mode, so its BatchNorm statistics follow the LR data.
    config.train.update(trainable="^classifier/", update_batch_stats=True)
    config.loss.update(sample_rate=0.6, z_coef=0.0, balance_coef=0.0)
    config.optimizer.update(learning_rate=2e-3)


def _full_fine_tuning(config):
    config.loss.update(z_coef=0.0, balance_coef=0.0)


def _with_router_losses(config):
    # FaceMoE stage 2 (train_full.py): everything trains from the stage-1 run with its
    # classifier, the router losses weighted by lambda_aux = 10.
    config.init_classifier = True
    config.loss.update(z_coef=10 * config.loss.z_coef, balance_coef=10 * config.loss.balance_coef)


def _upcycled(config):
    config.loss.update(z_coef=10 * config.loss.z_coef, balance_coef=10 * config.loss.balance_coef)


register(Recipe("pretrained", "HR pre-trained model, no adaptation", train=False))
register(
    Recipe(
        "classifier_only",
        "backbone frozen, new classifier (FaceMoE stage 1)",
        configure=_classifier_only,
    )
)
register(
    Recipe(
        "full_ft", "full fine-tuning, new classifier, no router losses", configure=_full_fine_tuning
    )
)
register(
    Recipe(
        "facemoe",
        "FaceMoE stage 2: full fine-tuning from stage 1 + router losses x10",
        start="classifier_only",
        configure=_with_router_losses,
    )
)
register(
    Recipe(
        "upcycled",
        "dense HR pre-training upcycled to MoE, then full fine-tuning",
        start=DENSE_PRETRAINED,
        configure=_upcycled,
    )
)


def _petalface_zero_up(config):
    recipes.petalface(config, rank=4, head=False)
    config.model.lora.init = "zero_up"


# PETALface (issue 11): the same budget from the same pre-trained model, adapters only.
register(
    Recipe(
        "petalface",
        "PETALface: 2 quality-mixed LoRA (rank 4) on qkv, backbone frozen",
        configure=lambda c: recipes.petalface(c, rank=4, head=False),
    )
)
register(
    Recipe(
        "petalface_zero_up",
        "PETALface with B = 0 at the start (the pre-trained function)",
        configure=_petalface_zero_up,
    )
)
register(
    Recipe(
        "lora",
        "one LoRA (rank 4) on qkv, backbone frozen (PETALface's ablation)",
        configure=lambda c: recipes.petalface(c, rank=4, head=False, quality_mix=False),
    )
)


def _distilled(instance_weight: float, relation_weight: float):
    # The HR model is both the frozen teacher and the student's start (config.init_from).
    return lambda c: recipes.distillation(c, instance_weight, relation_weight, teacher=c.init_from)


def _adapt_bn(config):
    config.eval.adapt_bn = "cumulative"


# Adaptable instance-relation distillation (issue 12): paired LR/HR data, the same for all rows.
W_INSTANCE, W_RELATION = recipes.DISTILL_INSTANCE_WEIGHT, recipes.DISTILL_RELATION_WEIGHT
register(
    Recipe(
        "lr_student",
        "full fine-tuning on paired LR captures, no distillation",
        configure=_distilled(0.0, 0.0),
    )
)
register(
    Recipe(
        "aird_instance",
        "+ instance distillation from the frozen HR model",
        configure=_distilled(W_INSTANCE, 0.0),
    )
)
register(
    Recipe(
        "aird_relation",
        "+ relation distillation (global batch)",
        configure=_distilled(0.0, W_RELATION),
    )
)
register(
    Recipe(
        "aird", "+ instance and relation distillation", configure=_distilled(W_INSTANCE, W_RELATION)
    )
)
register(
    Recipe(
        "aird_adapt_bn",
        "aird evaluated with test-time BatchNorm adaptation",
        start="aird",
        configure=_adapt_bn,
        train=False,
    )
)
register(
    Recipe(
        "lr_student_adapt_bn",
        "lr_student evaluated with test-time BatchNorm adaptation",
        start="lr_student",
        configure=_adapt_bn,
        train=False,
    )
)


def _recognizability(attention: bool = True, diversion: bool = True):
    # On the paired LR set of lr_student (its baseline): the quality head learns from clean
    # copies, and on the fixed-capture set the clean image would itself be an 8-16 px capture.
    def configure(config):
        _full_fine_tuning(config)
        recipes.recognizability(config, attention=attention, diversion=diversion)
        recipes.paired_lr_data(config)
        config.eval.quality_identities = 1000  # error-versus-reject on 56,000 held-out pairs

    return configure


# Recognizability index (issue 13): lr_student plus RI's parts, and without each part.
register(
    Recipe(
        "ri",
        "lr_student + recognizability index: c_UI, diversion loss, "
        "perceptibility attention, quality head",
        configure=_recognizability(),
    )
)
register(
    Recipe(
        "ri_no_diversion",
        "ri without the index diversion loss",
        configure=_recognizability(diversion=False),
    )
)
register(
    Recipe(
        "ri_no_attention",
        "ri without the perceptibility attention",
        configure=_recognizability(attention=False),
    )
)


def _petalface_ri_quality(config, workdirs):
    recipes.petalface(config, rank=4, head=False)
    config.model.lora.quality = quality_lib.RECOGNIZABILITY + workdirs["ri"]


register(
    Recipe(
        "petalface_ri",
        "PETALface with `a` from the ri row's quality head (not sharpness)",
        uses=("ri",),
        configure=_petalface_ri_quality,
    )
)


SYNTHETIC = runner.Suite(
    name="synthetic",
    recipes=RECIPES,
    columns=COLUMNS,
    plot=PLOT,
    adaptation_config=adaptation_config,
    starts=_starts,
    settings=StudySettings(),
    title="Low-resolution adaptation study",
)
