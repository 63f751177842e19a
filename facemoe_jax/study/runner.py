"""What every suite of the low-resolution adaptation study shares: running a row (or reading it
back), the order of rows, the table, results.json and the plot.

A suite (`Suite`: synthetic.py, lfw.py) gives the rows, the columns, the plot and how a row's run
config is made. Rows already finished (same settings) are read back, not recomputed, so a second
run of the same command prints the table at once and an interrupted study continues where it
stopped.

Output in `--out`: table.md, results.json (every row and seed, with the settings), and
hr_vs_lr.png (HR accuracy against LR accuracy, one point per recipe).

Adding a row = registering a `Recipe` (rows.py) in a suite's registry (a name, what it starts
from, how it changes the adaptation config); the loop below does not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from etils import epath

from facemoe_jax.core.paths import workdir_path
from facemoe_jax.core.progress import format_duration
from facemoe_jax.study.rows import DENSE_PRETRAINED, PRETRAINED, SCRATCH, Recipe


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


def read_json(path: str):
    try:
        with epath.Path(path).open() as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def prepare_run_dir(directory: str, key: str) -> None:
    """A run folder for settings `key`: one interrupted with the same settings (a stopped study)
    is kept, so the run continues from its last checkpoint; one made with other settings is
    cleared."""
    pending = read_json(os.path.join(directory, "pending.json"))
    path = epath.Path(directory)
    if path.is_dir() and not (pending and pending.get("fingerprint") == key):
        path.rmtree()
    path.mkdir(parents=True, exist_ok=True)
    with epath.Path(directory, "pending.json").open("w") as f:
        json.dump({"fingerprint": key}, f)


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


def pick_columns(results: dict, columns: tuple) -> dict[str, float]:
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
    base, recipe: Recipe, settings, seed: int, out: str, starts: dict, suite: Suite
) -> dict:
    """Trains (or evaluates) one row; returns its record (also in row_dir/row.json)."""
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
            read_json(os.path.join(directory, "row.json"))
            or read_json(os.path.join(directory, "done.json"))
            or {"path": str(workdir_path(directory))}
        )
        return key.get("fingerprint", key)

    key = fingerprint(
        settings_changed(config),
        recipe.train,
        run_key(start_dir),
        *[run_key(used[name]) for name in recipe.uses],
    )
    record = read_json(os.path.join(row_dir, "row.json"))
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


def order_rows(names: list[str], registry: dict) -> list[Recipe]:
    """The requested recipes plus the rows they start from, each after its start."""
    ordered: list[Recipe] = []

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
    suite: Suite,
    seeds: int = 1,
    recipes=None,
    pretrained: str | None = None,
    settings=None,
) -> dict:
    """Runs (or reads back) every row; writes table.md, results.json, hr_vs_lr.png."""
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


def format_table(summary: dict, columns: tuple) -> str:
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


def write_outputs(out, summary, records, settings, base, seconds: float, suite: Suite) -> None:
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


def plot_trade_off(summary: dict, path: str, axes: tuple) -> None:
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
