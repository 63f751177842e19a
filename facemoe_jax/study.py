r"""The low-resolution adaptation study: every recipe from one HR model, the same columns.

  python -m facemoe_jax.study --out runs/study                  # pre-train, then every recipe
  python -m facemoe_jax.study --out runs/study --seeds 3        # mean ± std over 3 seeds
  python -m facemoe_jax.study --out runs/study --pretrained runs/demo   # skip pre-training

What the seed papers (FaceMoE, PETALface, instance-relation distillation, recognizability) all
report: a model pre-trained on high-resolution (HR) faces is adapted to low-resolution (LR) data
by several methods; each row shows what the method gained at LR and what it kept at HR.

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
Rows already finished (same settings) are read back, not recomputed, so a second run of the same
command prints the table at once and an interrupted study continues where it stopped.

Output in `--out`: table.md, results.json (every row and seed, with the settings), and
hr_vs_lr.png (HR accuracy against LR rank-1, one point per recipe).

Adding a row = registering a `Recipe` in `study_rows.py` (a name, what it starts from, how it
changes the adaptation config); the loop below does not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from etils import epath

from facemoe_jax.core import messages
from facemoe_jax.core.progress import format_duration
from facemoe_jax import study_lfw
from facemoe_jax.study_rows import DENSE_PRETRAINED, PRETRAINED, RECIPES, SCRATCH, Recipe
from facemoe_jax.core.paths import workdir_path

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


@dataclasses.dataclass(frozen=True)
class Suite:
    """One study: its rows, columns, plot, and how a row's run config is made.

    adaptation_config(base, recipe, settings, seed, start, used) -> the row's run config.
    starts(base, out, rows, pretrained, settings) -> {PRETRAINED (and DENSE_PRETRAINED when a
      row starts there): the run or model file rows start from}.
    plot: ((x metric key, x label), (y metric key, y label)) of the trade-off picture.
    time_guess: the ETA's first guesses until a row has run.
    seedless_evaluation: the evaluation draws nothing from the seed, so a row that evaluates a
      start as it is runs once and serves every seed.
    """

    name: str
    recipes: dict
    columns: tuple
    plot: tuple
    adaptation_config: Callable
    starts: Callable
    settings: Any
    title: str
    time_guess: tuple[float, float] = (0.35, 30.0)  # seconds per step, per evaluation (2 CPUs)
    seedless_evaluation: bool = False  # the columns draw nothing from config.seed
    # Smaller tables after the main one: (heading, columns); a table lists the rows that have
    # any of its metrics (the quality head's, which only some rows evaluate).
    tables: tuple = ()

    @property
    def all_columns(self) -> tuple:
        return self.columns + tuple(c for _, columns in self.tables for c in columns)


def fingerprint(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_changed(config: ml_collections.ConfigDict) -> dict:
    """The config's fields that differ from the project's defaults (or that the defaults lack),
    as {"section.field": value}: what a run's fingerprint hashes, so a setting added later at
    its default leaves finished rows reusable."""
    from facemoe_jax.core import defaults

    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    given, default = flat(config.to_dict()), flat(defaults.get_base_config().to_dict())
    missing = object()
    return {k: v for k, v in given.items() if default.get(k, missing) != v}


# ---- Running rows.


def _read_json(path: str):
    try:
        with epath.Path(path).open() as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def prepare_run_dir(directory: str, key: str) -> None:
    """A run folder for settings `key`: one interrupted with the same settings (a stopped study)
    is kept, so the run continues from its last checkpoint; one made with other settings is
    cleared."""
    pending = _read_json(os.path.join(directory, "pending.json"))
    path = epath.Path(directory)
    if path.is_dir() and not (pending and pending.get("fingerprint") == key):
        path.rmtree()
    path.mkdir(parents=True, exist_ok=True)
    with epath.Path(directory, "pending.json").open("w") as f:
        json.dump({"fingerprint": key}, f)


def ensure_pretrained(base, out: str, dense: bool, given: str | None) -> str:
    """The pre-training workdir (trained now unless already there, or `given`)."""
    if given and not dense:
        from facemoe_jax.train.checkpoint import restore_params

        restore_params(given)  # fails now, naming the path, if it holds no checkpoint
        return str(workdir_path(given))
    workdir = os.path.join(out, "pretrain_dense" if dense else "pretrain_moe")
    config = pretraining_config(base, dense)
    done = _read_json(os.path.join(workdir, "done.json"))
    key = fingerprint(settings_changed(config))
    if done and done.get("fingerprint") == key:
        return workdir
    prepare_run_dir(workdir, key)
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


def evaluate_start(start: str, config, row_dir: str) -> dict:
    """The "no adaptation" row: the starting checkpoint (or model file: ONNX, PyTorch, whose
    architecture is `config.model`) under the study's evaluation."""
    from facemoe_jax.evaluate import suite
    from facemoe_jax.interop.load import is_run_directory, load_variables
    from facemoe_jax.models import build_model
    from facemoe_jax.pipelines import run_evaluations
    from facemoe_jax.train.calibrate_bn import calibrate_if_needed
    from facemoe_jax.train.writers import make_writer

    config = ml_collections.ConfigDict(config.to_dict())
    loaded = load_variables(start, config, field="the study's start")
    if is_run_directory(start):
        row_model = config.model
        config.model = loaded.config.model  # a run names its own architecture
        if row_model.get("onnx_batchnorm", "off") != "off":
            # ... except the BatchNorms the row inserts for test-time adaptation (aird_adapt_bn)
            config.model.update(
                onnx_batchnorm=row_model.onnx_batchnorm,
                onnx_batchnorm_images=row_model.onnx_batchnorm_images,
            )
    variables, step = loaded.variables, loaded.step or 0
    suite.check_eval_config(config)
    model = build_model(config.model)
    variables = calibrate_if_needed(model, variables, config)  # inserted BatchNorms: from HR
    writer = make_writer(row_dir)
    results = run_evaluations(model, variables, config, row_dir, step, writer)
    writer.flush()
    return results


def trainable_share(config) -> float:
    """Share of encoder parameters the row trains (0 for evaluation-only rows)."""
    from facemoe_jax.models import build_model
    from facemoe_jax.train import optimizer as optimizer_lib
    from facemoe_jax.train import state as state_lib
    from facemoe_jax.train import trainable

    model = build_model(config.model)
    optimizer, _ = optimizer_lib.build_optimizer(config.optimizer, 1)
    params = state_lib.abstract_train_state(model, optimizer, config).params
    mask = trainable.trainable_mask(params, config.train.trainable)
    trained, total = trainable.trainable_count(params["encoder"], mask["encoder"])
    return trained / total


def pick_columns(results: dict, columns=COLUMNS) -> dict[str, float]:
    row = {}
    for entry, metric, *_ in columns:
        value = results.get(entry, {}).get(metric)
        if value is not None:
            row[f"{entry}/{metric}"] = float(value)
    return row


class Progress:
    """Which row runs, and an ETA from the seconds per training step measured so far."""

    def __init__(self, rows: list[tuple[int, Recipe]], steps: int, guess=(0.35, 30.0)):
        self.total = len(rows)
        self.remaining_steps = sum(steps for _, r in rows if r.train)
        self.remaining_evals = len(rows)
        # First guesses (seconds per step, per evaluation on 2 CPU cores), replaced by data.
        self.step_seconds, self.eval_seconds = guess
        self.t0 = time.perf_counter()

    def start(self, index: int, seed: int, recipe: Recipe, reused: bool):
        eta = self.remaining_steps * self.step_seconds + self.remaining_evals * self.eval_seconds
        state = "reused" if reused else "running"
        print(
            f"[study] row {index}/{self.total}: {recipe.name} (seed {seed}) {state}; "
            f"elapsed {format_duration(time.perf_counter() - self.t0)}, ETA {format_duration(eta)}",
            flush=True,
        )

    def finish(self, recipe: Recipe, steps: int, seconds: float, reused: bool):
        self.remaining_evals -= 1
        if recipe.train:
            self.remaining_steps -= steps
            if not reused:
                self.step_seconds = max(seconds - self.eval_seconds, 1.0) / steps


def run_dir(out: str, seed: int, name: str) -> str:
    """Where the study keeps row `name`'s run of `seed`."""
    return os.path.join(out, f"seed{seed}", name)


def row_seed(recipe: Recipe, seed: int, suite: Suite, starts: dict) -> int:
    """The seed whose run serves `seed`: 0 for a row that evaluates a start as it is under a
    seedless evaluation (the same numbers for every seed, computed once), else `seed`."""
    if not recipe.train and suite.seedless_evaluation and recipe.start in starts:
        return 0
    return seed


def run_row(
    base, recipe: Recipe, settings, seed: int, out: str, starts: dict, suite: Suite = None
) -> dict:
    """Trains (or evaluates) one row; returns its record (also in row_dir/row.json)."""
    suite = suite or SYNTHETIC
    if row_seed(recipe, seed, suite, starts) != seed:
        return dict(run_row(base, recipe, settings, 0, out, starts, suite), seed=seed)
    row_dir = run_dir(out, seed, recipe.name)
    if recipe.start == SCRATCH:
        start_dir = ""
    elif recipe.start in (PRETRAINED, DENSE_PRETRAINED):
        start_dir = starts[recipe.start]
    else:
        start_dir = run_dir(out, seed, recipe.start)
    used = {name: run_dir(out, seed, name) for name in recipe.uses}
    config = suite.adaptation_config(base, recipe, settings, seed, start_dir, used)

    def run_key(directory):  # what identifies the run a row reads: its own fingerprint
        if not directory:
            return SCRATCH
        key = (
            _read_json(os.path.join(directory, "row.json"))
            or _read_json(os.path.join(directory, "done.json"))
            or {"path": str(workdir_path(directory))}
        )
        return key.get("fingerprint", key)

    key = fingerprint(
        settings_changed(config),
        recipe.train,
        run_key(start_dir),
        *[run_key(used[name]) for name in recipe.uses],
    )
    record = _read_json(os.path.join(row_dir, "row.json"))
    if record and record.get("fingerprint") == key:
        record["reused"] = True
        return record
    prepare_run_dir(row_dir, key)
    t0 = time.perf_counter()
    if recipe.train:
        from facemoe_jax.pipelines import train_and_evaluate

        results = train_and_evaluate(config, row_dir)
        share = trainable_share(config)
    else:
        results = evaluate_start(start_dir, config, row_dir)
        share = 0.0
    record = {
        "recipe": recipe.name,
        "description": recipe.description,
        "seed": seed,
        "start": recipe.start,
        "steps": int(config.train.num_steps) if recipe.train else 0,
        "trainable_share": share,
        "metrics": pick_columns(results, suite.all_columns),
        "seconds": time.perf_counter() - t0,
        "fingerprint": key,
    }
    with epath.Path(row_dir, "row.json").open("w") as f:
        json.dump(record, f, indent=2)
    record["reused"] = False
    return record


def order_rows(names: list[str], registry: dict | None = None) -> list[Recipe]:
    """The requested recipes plus the rows they start from, each after its start."""
    ordered: list[Recipe] = []
    registry = RECIPES if registry is None else registry

    def add(name: str, chain: tuple = ()):
        if name in (PRETRAINED, DENSE_PRETRAINED) and name not in registry:
            return
        if name not in registry:
            raise ValueError(f"--recipes: {name!r} is not a registered recipe ({sorted(registry)})")
        if name in chain:
            raise ValueError(f"study recipes start from each other in a loop: {chain + (name,)}")
        recipe = registry[name]
        for needed in (recipe.start, *recipe.uses):
            if needed not in (PRETRAINED, DENSE_PRETRAINED, SCRATCH):
                add(needed, chain + (name,))
        if recipe not in ordered:
            ordered.append(recipe)

    for name in names:
        add(name)
    return ordered


def run_study(
    base,
    out: str,
    *,
    seeds: int = 1,
    recipes=None,
    pretrained: str | None = None,
    settings=None,
    suite: Suite | None = None,
) -> dict:
    """Runs (or reads back) every row; writes table.md, results.json, hr_vs_lr.png."""
    suite = suite or SYNTHETIC
    settings = suite.settings if settings is None else settings
    if seeds < 1:
        raise ValueError(f"--seeds={seeds} must be >= 1")
    if settings.steps < 1:
        raise ValueError(f"--steps={settings.steps} must be >= 1")
    out = str(workdir_path(out))  # a URL (gs://...) stays a URL: files go through epath
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    rows = order_rows(list(recipes or suite.recipes), suite.recipes)
    t0 = time.perf_counter()
    starts = suite.starts(base, out, rows, pretrained, settings)
    plan = [(seed, recipe) for seed in range(seeds) for recipe in rows]
    progress = Progress([(s, r) for s, r in plan], settings.steps, suite.time_guess)
    records = []
    for index, (seed, recipe) in enumerate(plan, 1):
        row_dir = run_dir(out, row_seed(recipe, seed, suite, starts), recipe.name)
        progress.start(index, seed, recipe, epath.Path(row_dir, "row.json").is_file())
        record = run_row(base, recipe, settings, seed, out, starts, suite)
        progress.finish(recipe, settings.steps, record["seconds"], record["reused"])
        records.append(record)
    summary = summarise(records, rows)
    write_outputs(out, summary, records, settings, base, time.perf_counter() - t0, suite)
    return summary


def summarise(records: list[dict], rows: list[Recipe]) -> dict:
    """{recipe: {"description", "trainable_share", "seeds", metric: (mean, std)}}."""
    summary = {}
    for recipe in rows:
        mine = [r for r in records if r["recipe"] == recipe.name]
        entry = {
            "description": recipe.description,
            "trainable_share": mine[0]["trainable_share"],
            "trained": recipe.train,
            "steps": int(mine[0].get("steps", 0)),
            "seeds": len(mine),
            "minutes": float(np.mean([r["seconds"] for r in mine])) / 60,
        }
        for key in mine[0]["metrics"]:
            values = np.array([r["metrics"][key] for r in mine])
            entry[key] = (float(values.mean()), float(values.std()))
        summary[recipe.name] = entry
    return summary


def format_table(summary: dict, columns=COLUMNS) -> str:
    """Columns are (entry, metric, title), shown in % with one decimal, or (entry, metric,
    title, "ratio") for a number shown as it is with three (a rank correlation)."""
    titles = [column[2] for column in columns]
    lines = [
        "| recipe | encoder trained | steps | " + " | ".join(titles) + " | min/row |",
        "|---" * (len(titles) + 4) + "|",
    ]
    for name, entry in summary.items():
        cells = []
        for column in columns:
            value = entry.get(f"{column[0]}/{column[1]}")
            scale, digits = (1, 3) if tuple(column[3:]) == ("ratio",) else (100, 1)
            if value is None:
                cells.append("-")
            elif entry["seeds"] > 1:
                cells.append(f"{scale * value[0]:.{digits}f} ± {scale * value[1]:.{digits}f}")
            else:
                cells.append(f"{scale * value[0]:.{digits}f}")
        share = entry["trainable_share"]
        trains = f"{100 * share:.1f} %" if entry["trained"] else "-"
        steps = entry.get("steps", 0) or "-"
        lines.append(
            f"| {name} | {trains} | {steps} | " + " | ".join(cells) + f" | {entry['minutes']:.1f} |"
        )
    return "\n".join(lines)


def write_outputs(out, summary, records, settings, base, seconds: float, suite=None) -> None:
    suite = suite or SYNTHETIC
    table = format_table(summary, suite.columns)
    seeds = max(entry["seeds"] for entry in summary.values())
    header = (
        f"{suite.title} ({seeds} seed{'s' if seeds > 1 else ''}; "
        f"values in %"
        f"{', mean ± std over seeds' if seeds > 1 else ''}).\n\n"
    )
    for heading, columns in suite.tables:
        keys = {f"{entry}/{metric}" for entry, metric, *_ in columns}
        having = {name: entry for name, entry in summary.items() if keys & set(entry)}
        if having:
            table += f"\n\n{heading}\n\n" + format_table(having, columns)
    with epath.Path(out, "table.md").open("w") as f:
        f.write(header + table + "\n")
        f.write("\n" + "\n".join(f"- {n}: {e['description']}" for n, e in summary.items()) + "\n")
    with epath.Path(out, "results.json").open("w") as f:
        json.dump(
            {
                "suite": suite.name,
                "settings": dataclasses.asdict(settings),
                "pretraining_config": base.to_dict(),
                "summary": summary,
                "rows": [{k: v for k, v in r.items() if k != "reused"} for r in records],
                "seconds": seconds,
            },
            f,
            indent=2,
            default=str,
        )
    plot_trade_off(summary, os.path.join(out, "hr_vs_lr.png"), suite.plot)
    print(header + table, flush=True)
    print(
        f"[study] done in {format_duration(seconds)}; table.md, results.json and hr_vs_lr.png in {out}",
        flush=True,
    )


SYNTHETIC_PLOT = (
    ("synthetic_tinyface/rank1", "LR identification rank-1 (%)"),
    ("synthetic/accuracy", "HR verification accuracy (%)"),
)


def plot_trade_off(summary: dict, path: str, axes=SYNTHETIC_PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, entry in summary.items():
        hr = entry.get(axes[1][0])
        lr = entry.get(axes[0][0])
        if hr is None or lr is None:
            continue
        ax.errorbar(
            100 * lr[0], 100 * hr[0], xerr=100 * lr[1], yerr=100 * hr[1], fmt="o", capsize=3
        )
        ax.annotate(name, (100 * lr[0], 100 * hr[0]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(axes[0][1])
    ax.set_ylabel(axes[1][1])
    ax.set_title("Low-resolution adaptation: LR gain vs HR kept")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    epath.Path(path).write_bytes(buffer.getvalue())
    plt.close(fig)


# ---- Command line.


def _synthetic_starts(base, out, rows, pretrained, settings) -> dict:
    del settings
    starts = {PRETRAINED: ensure_pretrained(base, out, dense=False, given=pretrained)}
    if any(r.start == DENSE_PRETRAINED for r in rows):
        starts[DENSE_PRETRAINED] = ensure_pretrained(base, out, dense=True, given=None)
    return starts


def _lfw_starts(base, out, rows, pretrained, settings) -> dict:
    del base, out, rows
    if pretrained:
        raise ValueError("--pretrained: the lfw suite starts from --teacher")
    study_lfw.check_paths(settings)
    return {PRETRAINED: os.path.abspath(settings.teacher)}


SYNTHETIC = Suite(
    name="synthetic",
    recipes=RECIPES,
    columns=COLUMNS,
    plot=SYNTHETIC_PLOT,
    adaptation_config=adaptation_config,
    starts=_synthetic_starts,
    settings=StudySettings(),
    title="Low-resolution adaptation study",
)
LFW = Suite(
    name="lfw",
    recipes=study_lfw.RECIPES,
    columns=study_lfw.COLUMNS,
    plot=study_lfw.PLOT,
    adaptation_config=study_lfw.adaptation_config,
    starts=_lfw_starts,
    settings=study_lfw.LfwSettings(),
    title="Low-resolution adaptation on real faces (LFW)",
    time_guess=(3.5, 480.0),
    seedless_evaluation=True,
    tables=study_lfw.TABLES,
)
LFW_VALIDATION = dataclasses.replace(
    LFW,
    name="lfw-validation",
    columns=study_lfw.VALIDATION_COLUMNS,
    plot=study_lfw.VALIDATION_PLOT,
    title="Choosing settings on held-out training people (LFW View 1)",
    time_guess=(3.5, 150.0),
)
SUITES = {suite.name: suite for suite in (SYNTHETIC, LFW, LFW_VALIDATION)}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m facemoe_jax.study",
        description="Low-resolution adaptation study: every registered recipe from one HR "
        "pre-trained model, with the same budget, seed and evaluation.",
    )
    parser.add_argument("--out", required=True, help="study folder (rows are reused from it)")
    parser.add_argument(
        "--suite",
        default="synthetic",
        choices=sorted(SUITES),
        help="synthetic: the embedded identities, nothing downloaded (default); lfw: real "
        "faces, the ONNX --teacher adapted on LFW View 1's training people; lfw-validation: "
        "the same rows without 20 %% of the training people who have two or more images, "
        "scored on pairs among them "
        "(for choosing settings)",
    )
    parser.add_argument(
        "--config",
        default="configs/demo.py",
        help="synthetic suite: the pre-training config file (default: configs/demo.py)",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="synthetic suite: an existing HR run (workdir) to adapt instead of pre-training",
    )
    parser.add_argument(
        "--lfw",
        default=study_lfw.DEFAULT_LFW,
        help="lfw suite: the LFW folder (aligned112/, "
        "the pairs and people files; default ../shared/realfaces/lfw)",
    )
    parser.add_argument(
        "--teacher",
        default=study_lfw.DEFAULT_TEACHER,
        help="lfw suite: the HR model, an ONNX "
        "face recognizer taking (pixel - 127) / 128 (default: the real one in ../shared)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="adaptation seeds (mean ± std)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"adaptation steps per row (default: synthetic {StudySettings.steps}, lfw "
        f"{study_lfw.LfwSettings.steps})",
    )
    parser.add_argument("--recipes", default="", help="comma list (default: all of the suite's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one of the suite's settings (repeatable), e.g. --set learning_rate=5e-4 "
        "(the lfw suites' fields: study_lfw.LfwSettings)",
    )
    args = parser.parse_args(argv)
    import jax

    from facemoe_jax.train.hooks import Preempted

    jax.config.update("jax_threefry_partitionable", True)  # as facemoe_jax.main
    suite = SUITES[args.suite]
    try:
        if suite in (LFW, LFW_VALIDATION):
            settings = study_lfw.LfwSettings(lfw_dir=args.lfw, teacher=args.teacher)
            if suite is LFW_VALIDATION:
                split = os.path.join(str(workdir_path(args.out)), "validation_split")
                settings = dataclasses.replace(settings, validation_dir=split)
            study_lfw.check_paths(settings)
            base = study_lfw.base_config(settings)
        else:
            settings, base = StudySettings(), load_config(args.config)
        if args.steps is not None:
            settings = dataclasses.replace(settings, steps=args.steps)
        settings = with_settings(settings, args.set)
        recipes = [r.strip() for r in args.recipes.split(",") if r.strip()] or None
        run_study(
            base,
            args.out,
            seeds=args.seeds,
            recipes=recipes,
            pretrained=args.pretrained,
            settings=settings,
            suite=suite,
        )
    except (ValueError, OSError) as e:
        messages.error(e)
        return 2
    except Preempted as e:  # SIGTERM/SIGINT: the running row saved its step; rerun to continue
        messages.say(f"{messages.one_line(e)} (study: run the same study command to continue)")
        return 75
    return 0


def with_settings(settings, assignments: list[str]):
    """`settings` (a dataclass) with each "FIELD=VALUE" applied, VALUE read as the field's
    type; an unknown field or a value of the wrong type fails, naming them."""
    fields = {f.name: f for f in dataclasses.fields(settings)}
    changes = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or name not in fields:
            raise ValueError(
                f"--set {assignment!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}"
            )
        kind = type(getattr(settings, name))
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                changes[name] = text.lower() == "true"
            else:
                changes[name] = kind(text)
        except ValueError:
            raise ValueError(f"--set {assignment!r}: {text!r} is not a {kind.__name__}") from None
    return dataclasses.replace(settings, **changes)


def load_config(path: str) -> ml_collections.ConfigDict:
    import importlib.util

    if not os.path.isfile(path):
        raise ValueError(f"--config={path!r} is not a file")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)  # config files import configs.common
    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


if __name__ == "__main__":
    from facemoe_jax.core import huge_pages

    huge_pages.restart_with_huge_pages()  # see facemoe_jax/huge_pages.py
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
