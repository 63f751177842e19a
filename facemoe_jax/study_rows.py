"""The rows of the low-resolution adaptation study (`study.py`): what each one starts from and
how it changes the adaptation config.

Adding a row = registering a `Recipe` here (a name, its start, how it configures the run); the
study's loop does not change. The method set-ups themselves live in `recipes.py`, shared with
the config files, so a study row and `configs/*.py` apply exactly the same recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


from facemoe_jax import recipes
from facemoe_jax.models import quality as quality_lib

PRETRAINED = "pretrained"  # the HR MoE pre-training run
DENSE_PRETRAINED = "dense_pretrained"  # its dense twin (for upcycling)
SCRATCH = "scratch"  # no start: the row's model is initialised from its seed


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One row of the study.

    name: the row's name; description: one line for the table.
    start: PRETRAINED, DENSE_PRETRAINED, SCRATCH (a fresh model) or another recipe's name (its
      run is the starting point).
    configure: changes the adaptation config in place (trainable set, losses, lr, ...); called
      as configure(config), or configure(config, workdirs) when the row `uses` other rows.
    train: False = evaluate the starting point as it is (the "no adaptation" row).
    uses: other rows whose runs this row reads besides its start (e.g. a quality model); they
      run first, `workdirs` maps each name to its run, and a rerun of one reruns this row.
    """

    name: str
    description: str
    start: str = PRETRAINED
    configure: Callable[..., None] = lambda config: None
    train: bool = True
    uses: tuple[str, ...] = ()


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe, registry: dict[str, Recipe] | None = None) -> Recipe:
    """Adds `recipe` to `registry` (default: the synthetic suite's RECIPES)."""
    registry = RECIPES if registry is None else registry
    if recipe.name in registry:
        raise ValueError(f"a study recipe named {recipe.name!r} is already registered")
    registry[recipe.name] = recipe
    return recipe


# ---- The recipes of the low-resolution adaptation issue.


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
