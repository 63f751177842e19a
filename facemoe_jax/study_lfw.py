"""The real-faces suite of the low-resolution adaptation study (`python -m facemoe_jax.study
--suite lfw`): a real HR recognizer adapted to 8-32 px faces on LFW View 1's training people,
every row scored on the same LFW test pairs at 112/24/16/12/8 px.

Protocol (docs/real_faces_study.md explains it and the measured table):
  HR model and teacher: an ONNX face recognizer (`--teacher`, default the real MobileFaceNet of
    ../shared/realfaces), run as a JAX model (models/onnx_graph.py): its initializers are the
    parameters every trained row starts from;
  training data: the LFW aligned folder restricted to `peopleDevTrain.txt` (View 1's training
    people), identities with two or more images as classes of the margin loss; every view is
    captured small with probability `lr_prob` (data/degrade.acquisition_low_resolution: optical
    blur, a sensor of `min_pixels`..`max_pixels` px, noise, JPEG, resized back);
  columns, the same for every row: `pairsDevTest.txt` (threshold from `pairsDevTrain.txt`) with
    both faces and with only the probe degraded, and the View 2 pairs whose two people are both in
    `peopleDevTest.txt` (10-fold on the file's folds), each at every size; no flip test.
No training image belongs to a test person: View 1's training and test people are disjoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import ml_collections

from facemoe_jax import recipes, study_rows
from facemoe_jax.study_rows import PRETRAINED, Recipe

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LFW = os.path.join(_REPO, "..", "shared", "realfaces", "lfw")
DEFAULT_TEACHER = os.path.join(
    _REPO, "..", "shared", "realfaces", "models", "faceplugin_fr_feature.onnx"
)
TRAIN_PEOPLE = "peopleDevTrain.txt"
VIEW1_TEST = "pairsDevTest.txt"
VIEW2_TEST_PEOPLE = "pairs.txt@peopleDevTest.txt"
SIZES = (112, 24, 16, 12, 8)


@dataclasses.dataclass(frozen=True)
class LfwSettings:
    lfw_dir: str = DEFAULT_LFW
    teacher: str = DEFAULT_TEACHER
    steps: int = 60  # training steps per row
    batch_size: int = 32
    learning_rate: float = 1e-4  # AdamW peak, linear warm-up then linear decay to 0
    warmup_steps: int = 6
    lr_prob: float = 0.75  # share of training views captured small (the rest stay HR)
    min_pixels: int = 8
    max_pixels: int = 32
    adapter_learning_rate: float = 5e-4  # PETALface's (configs/petalface.py)
    instance_weight: float = 20.0
    relation_weight: float = 40.0


def _columns():
    out = []
    for size in SIZES:
        out.append((f"lfw_view1@{size}px", "accuracy", f"V1 both {size}"))
    for size in SIZES[1:]:
        out.append((f"lfw_view1@probe{size}px", "accuracy", f"V1 probe {size}"))
    for size in SIZES:
        out.append((f"lfw_view2_peopleDevTest@{size}px", "accuracy", f"V2 test people {size}"))
    return tuple(out)


COLUMNS = _columns()
PLOT = (
    ("lfw_view1@12px/accuracy", "LFW View 1, both faces at 12 px (%)"),
    ("lfw_view1@112px/accuracy", "LFW View 1 at 112 px (%)"),
)


def check_paths(settings: LfwSettings) -> None:
    """Fails, naming the flag and the path, before anything runs."""
    if not os.path.isdir(os.path.join(settings.lfw_dir, "aligned112")):
        raise ValueError(
            f"--lfw={settings.lfw_dir!r}: no aligned112/ folder there (the LFW folder of "
            f"../shared/realfaces, see docs/real_faces.md)"
        )
    for name in (TRAIN_PEOPLE, "pairsDevTrain.txt", VIEW1_TEST, "pairs.txt", "peopleDevTest.txt"):
        if not os.path.isfile(os.path.join(settings.lfw_dir, name)):
            raise ValueError(f"--lfw={settings.lfw_dir!r}: {name} is missing")
    if not os.path.isfile(settings.teacher):
        raise ValueError(f"--teacher={settings.teacher!r} is not a file")


def base_config(settings: LfwSettings) -> ml_collections.ConfigDict:
    """The ONNX recognizer as a JAX model, with the suite's data and columns."""
    from facemoe_jax.core import defaults

    config = defaults.get_base_config()
    config.model.update(
        name="onnx",
        onnx_path=os.path.abspath(settings.teacher),
        image_size=112,
        embed_dim=512,
        # ../shared/realfaces/README.md: the model takes (pixel - 127) / 128.
        onnx_input_mean=127.0,
        onnx_input_std=128.0,
    )
    # The centres start at the teacher's class means (train/imprint.py): a random start pulls
    # every pre-trained embedding towards a random direction (margin loss ~44 at step 1 here).
    config.loss.update(
        margin="combined",
        m3=0.35,
        scale=64.0,
        z_coef=0.0,
        balance_coef=0.0,
        centre_init="imprint",
        imprint_images_per_class=4,
    )
    config.data.update(
        train="folder:" + os.path.join(os.path.abspath(settings.lfw_dir), "aligned112"),
        people_file=os.path.join(os.path.abspath(settings.lfw_dir), TRAIN_PEOPLE),
        min_images_per_identity=2,
        acquisition_prob=settings.lr_prob,
        acquisition_min_pixels=settings.min_pixels,
        acquisition_max_pixels=settings.max_pixels,
        worker_count=0,
    )
    config.eval.update(
        lfw_dir=os.path.abspath(settings.lfw_dir),
        lfw_pairs=f"{VIEW1_TEST},{VIEW2_TEST_PEOPLE}",
        lfw_resolutions=",".join(str(s) for s in SIZES),
        lfw_degrade="both,probe",
        flip_test=False,
        synthetic_pairs=0,
        synthetic_tinyface_identities=0,
        low_resolution_sets="",
        routing_map_faces=0,
        every_steps=0,
        batch_size=64,
    )
    return config


def adaptation_config(base, recipe: Recipe, settings: LfwSettings, seed: int, start: str, used):
    """Row `recipe`'s run: the base config from `start` (the teacher file or another row)."""
    from facemoe_jax.data import sources

    config = ml_collections.ConfigDict(base.to_dict())
    config.seed = seed
    config.init_from = start
    config.init_classifier = False
    config.train.update(
        num_steps=settings.steps,
        batch_size=settings.batch_size,
        log_every_steps=max(settings.steps // 4, 1),
    )
    config.optimizer.update(
        name="adamw",
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        weight_decay=0.05,
        end_learning_rate=0.0,
    )
    config.checkpoint.update(every_steps=settings.steps, max_to_keep=1)
    if recipe.uses:
        recipe.configure(config, settings, {name: used[name] for name in recipe.uses})
    else:
        recipe.configure(config, settings)
    if recipe.train:
        config = sources.with_data_counts(config)
    return config


# ---- The rows.

RECIPES: dict[str, Recipe] = {}
register = functools.partial(study_rows.register, registry=RECIPES)


def _lr_fine_tuning(config, settings):
    del config, settings  # the base: margin loss, every parameter, LR views


def _distilled(instance: bool, relation: bool):
    def configure(config, settings):
        recipes.distillation(
            config,
            settings.instance_weight if instance else 0.0,
            settings.relation_weight if relation else 0.0,
            teacher=os.path.abspath(settings.teacher),
        )
        config.data.acquisition_prob = settings.lr_prob  # the same views as teacher_lr_ft

    return configure


def _adapters(config, settings):
    # PETALface's idea on this network: the teacher frozen, adapters on its pointwise
    # convolutions (the head included), trained with the margin loss at PETALface's lr.
    config.model.lora.update(
        rank=8,
        scale=1.0,
        dropout=0.0,
        where="pointwise",
        init="zero_up",  # B = 0: the adapted model starts as the teacher
        quality_mix=False,
        head=False,
    )
    config.train.update(trainable="lora,^classifier/")
    config.optimizer.learning_rate = settings.adapter_learning_rate


register(Recipe("teacher", "the HR recognizer as it is", configure=lambda c, s: None, train=False))
register(
    Recipe(
        "teacher_lr_ft",
        "the teacher fine-tuned on LR views: margin loss, every parameter",
        configure=_lr_fine_tuning,
    )
)
register(
    Recipe(
        "aird_instance",
        "teacher_lr_ft + instance distillation to the frozen teacher's HR embedding",
        configure=_distilled(True, False),
    )
)
register(
    Recipe(
        "aird",
        "aird_instance + relation distillation (batch cosine matrices)",
        configure=_distilled(True, True),
    )
)
register(
    Recipe(
        "adapters",
        "teacher frozen; LoRA (rank 8) on its pointwise (1x1) convolutions, the head included, margin loss",
        configure=_adapters,
    )
)
assert all(r.start == PRETRAINED for r in RECIPES.values())
