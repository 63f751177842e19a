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

from facemoe_jax import recipes
from facemoe_jax.study import rows as rows_lib
from facemoe_jax.study import runner
from facemoe_jax.study.rows import PRETRAINED, SCRATCH, Recipe

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    quality_learning_rate: float = 1e-3  # the `ri` row's fresh quality head (the project default)
    # The ViT students, trained from scratch (`_student`): more steps at a higher lr than the
    # adaptation rows, on their own input size; the teacher's targets are cached per record.
    student_steps: int = 300
    student_batch_size: int = 128
    student_learning_rate: float = 3e-3  # chosen on the validation split (docs)
    student_image_size: int = 64
    # Validation (`--suite lfw-validation`): rows train without a held-out share of the
    # training people and are scored on pairs among them (data/validation_split.py).
    validation_dir: str = ""  # where the split's files are written; "" = the test columns
    validation_share: float = 0.2


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
# The `ri` row's quality head on pairsDevTest.txt (config.eval.lfw_quality), a second table:
# FNMR at FMR QUALITY_FMR with nothing rejected and after rejecting the 20 % lowest-quality
# pairs by the head, the embedding norm and at random, the area under each error-versus-reject
# curve, as given (both faces at 112 px) and with the second faces at mixed resolutions; the
# Spearman rho of the head's score with the resolution of faces degraded to every size.
QUALITY_COLUMNS = tuple(
    ("lfw_quality", f"{prefix}{metric}", f"{label} {title}")
    for prefix, label in (("", "HR"), ("mixed_", "mixed"))
    for metric, title in (
        ("fnmr_reject0", "FNMR"),
        ("fnmr_reject20_quality", "-20 % head"),
        ("fnmr_reject20_norm", "-20 % norm"),
        ("fnmr_reject20_random", "-20 % random"),
        ("erc_auc_quality", "AUC head"),
        ("erc_auc_norm", "AUC norm"),
    )
) + (
    ("lfw_quality", "spearman_rho", "rho(q, px)", "ratio"),
    ("lfw_quality", "spearman_rho_per_face", "rho per face", "ratio"),
)
# pairsDevTest.txt has 500 impostor pairs: at FMR 1e-3 the threshold would be the single
# highest impostor score (one pair decides it); at 1e-2 it is the 6th highest.
QUALITY_FMR = 1e-2
TABLES = (
    (
        f"Quality head (`ri`) on pairsDevTest.txt: FNMR at FMR={QUALITY_FMR:g} after rejecting "
        "pairs (%; a pair's quality is the lower of its two faces'), and rank correlations",
        QUALITY_COLUMNS,
    ),
)
VALIDATION_PAIRS = "view2"  # the split's pairs file is k-fold (View 2's layout)
VALIDATION_COLUMNS = tuple(
    (f"lfw_{VALIDATION_PAIRS}@{size}px", "accuracy", f"val both {size}") for size in SIZES
)
VALIDATION_PLOT = (
    (f"lfw_{VALIDATION_PAIRS}@12px/accuracy", "validation pairs, both faces at 12 px (%)"),
    (f"lfw_{VALIDATION_PAIRS}@112px/accuracy", "validation pairs at 112 px (%)"),
)
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


def base_config(settings: LfwSettings, split: tuple[str, str] | None = None):
    """The ONNX recognizer as a JAX model, with the suite's data and columns; with
    settings.validation_dir, the validation split's (`split`: its (people, pairs) files, else
    written by `validation_split`)."""
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
    _columns_of_every_row(config, settings)
    if settings.validation_dir:
        people, pairs = split or validation_split(settings)
        config.data.people_file = people
        config.eval.update(lfw_pairs=pairs, lfw_degrade="both")
    return config


def validation_split(settings: LfwSettings) -> tuple[str, str]:
    """(people file, pairs file) of the validation split of the training people, written to
    settings.validation_dir (the same files for the same settings)."""
    from facemoe_jax.data import folder, validation_split as split

    people = folder.read_people_file(os.path.join(settings.lfw_dir, TRAIN_PEOPLE))
    return split.write_split(
        os.path.join(settings.lfw_dir, "aligned112"),
        people,
        os.path.abspath(settings.validation_dir),
        share=settings.validation_share,
    )


def _columns_of_every_row(config, settings: LfwSettings) -> None:
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
register = functools.partial(rows_lib.register, registry=RECIPES)


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


def student_model(config, settings, moe: bool) -> None:
    """The ViT student: 64 px in 8 px patches (64 tokens), width 96, depth 4, MLP x2, a
    512-d embedding (the teacher's, for the instance term). The MoE twin replaces the MLP of
    blocks 1 and 3 by 4 experts of the same size with top-1 routing (Switch's: the expert's
    output times its softmax probability, so the router learns), so a token meets the same
    FLOPs in either (plus the router's 96 x 4); the capacity path (factor 1.5) because
    XLA:CPU runs the dropless grouped matmul densely (E/K = 4x the expert FLOPs)."""
    from facemoe_jax.core import defaults

    config.model = defaults.get_base_config().model
    config.model.update(
        image_size=settings.student_image_size,
        patch_size=8,
        width=96,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        embed_dim=512,
        moe_layers="every:2" if moe else "none",
        num_experts=4,
        top_k=1,
        router_combine="softmax_all",  # Switch: top-1 weighted by its softmax probability
        capacity_factor=1.5,
        drop_path_rate=0.0,
    )


def _student(moe: bool):
    def configure(config, settings):
        from facemoe_jax.core import defaults

        student_model(config, settings, moe)
        config.init_from = ""
        recipes.distillation(
            config,
            settings.instance_weight,
            settings.relation_weight,
            teacher=os.path.abspath(settings.teacher),
        )
        config.distill.teacher_cache = "auto"
        config.data.acquisition_prob = settings.lr_prob
        loss = defaults.get_base_config().loss
        # A fresh model has nothing to imprint; the router losses at the project's weights.
        config.loss.update(
            centre_init="random",
            z_coef=loss.z_coef if moe else 0.0,
            balance_coef=loss.balance_coef if moe else 0.0,
        )
        steps = settings.student_steps
        config.train.update(
            num_steps=steps,
            batch_size=settings.student_batch_size,
            log_every_steps=max(steps // 6, 1),
        )
        config.optimizer.update(
            learning_rate=settings.student_learning_rate, warmup_steps=max(steps // 10, 1)
        )
        config.checkpoint.update(every_steps=steps)
        config.eval.batch_size = 256

    return configure


def _adapt_bn(config, settings):
    # The graph's BatchNorms are folded into its convolutions: nothing to adapt. One is inserted
    # after every convolution, the identity at its statistics on HR training images
    # (train/calibrate_bn.py), then adapted to each evaluated set's own images (train/adapt_bn.py:
    # the first adapt_bn_batches batches of the set).
    del settings
    config.model.onnx_batchnorm = "every_conv"
    config.eval.adapt_bn = "cumulative"


def _quality_head(config, settings):
    # The recognizability index's quality head (recipes.recognizability; our reading of the
    # paper: docs/recognizability.md) on the best LR row: aird's encoder frozen, so the head
    # learns to predict how recognizable a face is to that very encoder, and only the fresh
    # head trains (init_from leaves what aird lacks at its initialiser). Its target is the
    # project's default ("agreement": each copy of the batch's clean faces at 4-32 px against
    # its own full-size embedding and its class's mean); no diversion loss and no attention,
    # both of which would change the encoder. The training people with one image have no
    # class: their copies carry no agreement target (data/sources.py allows them here).
    recipes.recognizability(config, attention=False, diversion=False)
    config.train.trainable = "^encoder/quality_head/"
    # aird's class centres (the index's prototypes, in the logged ri/* metrics) come with the
    # start; imprinting, which excludes that, would only recompute them from the same encoder.
    config.init_classifier = True
    config.loss.centre_init = "random"
    # c_UI only feeds the logged index here (the agreement target does not use it): a few
    # degraded faces a step keep it moving at a quarter of the default's forward passes.
    config.recognizability.ui_images = min(8, settings.batch_size)
    config.optimizer.learning_rate = settings.quality_learning_rate
    # The encoder is aird's, unchanged (frozen BatchNorm statistics kept), so the accuracy
    # columns would be aird's: only the quality evaluation runs.
    config.eval.update(
        lfw_pairs="",
        lfw_quality=VIEW1_TEST,
        quality_fmr=QUALITY_FMR,
        quality_resolutions=",".join(str(s) for s in SIZES[1:]),
    )


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
        "aird_adapt_bn",
        "aird evaluated with test-time BatchNorm adaptation (BatchNorms inserted after its "
        "convolutions, calibrated on HR training images)",
        start="aird",
        configure=_adapt_bn,
        train=False,
    )
)
register(
    Recipe(
        "adapters",
        "teacher frozen; LoRA (rank 8) on its pointwise (1x1) convolutions, the head included, margin loss",
        configure=_adapters,
    )
)
register(
    Recipe(
        "student_dense",
        "ViT from scratch at 64 px, distilled from the teacher (instance + relation) on LR and "
        "HR views",
        start=SCRATCH,
        configure=_student(moe=False),
    )
)
register(
    Recipe(
        "student_moe",
        "student_dense with 4 top-1 experts in blocks 1 and 3 (the same active FLOPs)",
        start=SCRATCH,
        configure=_student(moe=True),
    )
)
register(
    Recipe(
        "ri",
        "aird frozen + a fresh recognizability quality head, the only part trained (its "
        "accuracy is aird's: not re-measured)",
        start="aird",
        configure=_quality_head,
    )
)
# Every row starts from the teacher, from scratch, or from another row of this suite (which
# runner.order_rows runs first).
assert all(r.start in (PRETRAINED, SCRATCH) or r.start in RECIPES for r in RECIPES.values())


def _starts(base, out, rows, pretrained, settings) -> dict:
    del base, out, rows
    if pretrained:
        raise ValueError("--pretrained: the lfw suite starts from --teacher")
    check_paths(settings)
    return {PRETRAINED: os.path.abspath(settings.teacher)}


LFW = runner.Suite(
    name="lfw",
    recipes=RECIPES,
    columns=COLUMNS,
    plot=PLOT,
    adaptation_config=adaptation_config,
    starts=_starts,
    settings=LfwSettings(),
    title="Low-resolution adaptation on real faces (LFW)",
    time_guess=(3.5, 480.0),
    seedless_evaluation=True,
    tables=TABLES,
)
LFW_VALIDATION = dataclasses.replace(
    LFW,
    name="lfw-validation",
    columns=VALIDATION_COLUMNS,
    plot=VALIDATION_PLOT,
    title="Choosing settings on held-out training people (LFW View 1)",
    time_guess=(3.5, 150.0),
)
