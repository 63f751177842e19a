"""Orbax checkpoints of the train state, the data-iterator position, the loop counters and the
config.

A checkpoint step holds four items: `state` (params, optimiser, step, RNG, margin state, as
arrays), `data` (the grain iterator state of this host, one JSON file per process), `loop`
(JSON: skipped non-finite steps and the current streak of them) and `config` (JSON, for humans,
for export and for the resume check). Restoring targets abstract arrays that carry the current
mesh's shardings, so a run can continue on a different device layout.

Faults: Orbax writes a step into a temporary folder and renames it when complete (on buckets it
writes a commit marker), so a save cut by a kill is never listed. A listed step that cannot be
read (a truncated file, a missing _METADATA) is skipped with one warning line naming it, moved
aside to checkpoints_corrupt/STEP, and the step before it is restored. A workdir whose saved
config differs in an architecture or data field is refused in one line naming the fields.

Evaluation (`evaluation_config`) and export (`restore_params`) use the config saved beside the
weights: the model, data and seed a run was trained with are never asked for again on the
command line, which supplies only how the evaluation runs (RUNTIME_SECTIONS: config.eval ...).
"""

import copy
import dataclasses
import json
import logging
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from facemoe_jax.core import messages
from facemoe_jax.core.defaults import BEFORE_ADDED, upgrade
from facemoe_jax.core.paths import workdir_path
from facemoe_jax.train.state import LEGACY_AUX_FIELDS

# Fields a resumed run may not change: the architecture, the data stream, the state's structure.
# Everything else (learning rate, num_steps, logging, evaluation ...) is a training knob: it may
# change, and the change is printed.
FIXED_PREFIXES = ("model.", "data.")
FIXED_FIELDS = (
    "seed",
    "loss.class_rows_multiple",
    "optimizer.name",
    "optimizer.clip_scope",
    "train.trainable",
)
# Switches that add leaves to the state, with the value a checkpoint written before the switch
# existed had (core/defaults.BEFORE_ADDED where that differs from today's default): turning one
# on over such a checkpoint is refused like an architecture change (instead of failing to read
# the checkpoint).
STATE_SWITCHES = {
    "recognizability.enabled": False,
    "model.perceptibility_attention": False,
    "model.quality_head": False,
    # The quality head's input decides its parameters.
    "model.quality_head_input": BEFORE_ADDED["model.quality_head_input"],
    # The "agreement" target keeps per-class means in the state.
    "recognizability.quality_target": BEFORE_ADDED["recognizability.quality_target"],
}
# Fields that shape the state only when another field is on: a difference is no difference
# when both configs have that switch off (a model without a quality head has no head input).
ONLY_WITH = {
    "model.quality_head_input": "model.quality_head",
    "recognizability.quality_target": "model.quality_head",
}
DATA_KNOBS = (
    "data.worker_count",
    "data.max_bad_share",
    "data.synthetic_cache",
    "data.tfds_data_dir",
)
# Model fields that choose how the evaluation forward computes, not what the state holds.
MODEL_KNOBS = ("model.conv_algorithm",)
# Top-level sections that say how an evaluation or export runs, not what was trained: they come
# from the command line; every other field comes from the checkpoint's saved config.
RUNTIME_SECTIONS = ("eval", "mesh", "sharding_rules", "export")


class CheckpointError(ValueError):
    """A workdir's checkpoints cannot be used (all unreadable, or another architecture)."""


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _config_dict(config) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config))


def _is_fixed(field: str) -> bool:
    if field in DATA_KNOBS or field in MODEL_KNOBS:
        return False
    if field in STATE_SWITCHES:
        return True
    return field.startswith(FIXED_PREFIXES) or field in FIXED_FIELDS


def config_changes(saved, current) -> tuple[list[str], list[str]]:
    """(fixed fields that differ, knob changes as 'field old -> new') between two configs.
    Fields only one side has (the code gained or lost a field since) are listed with the knobs."""
    old, new = _flatten(_config_dict(saved)), _flatten(_config_dict(current))
    fixed, knobs = [], []
    for field in sorted(set(old) | set(new)):
        a = old.get(field, STATE_SWITCHES.get(field, "<absent>"))
        b = new.get(field, STATE_SWITCHES.get(field, "<absent>"))
        if a == b:
            continue
        switch = ONLY_WITH.get(field)
        if (
            switch
            and not old.get(switch, STATE_SWITCHES.get(switch))
            and not new.get(switch, STATE_SWITCHES.get(switch))
        ):
            continue
        if (field not in old or field not in new) and field not in STATE_SWITCHES:
            # A field added to (or removed from) the code since the checkpoint was written:
            # not a change the user made; shown, never refused.
            knobs.append(f"{field} {a!r} -> {b!r}" if field in old else f"{field} (new) {b!r}")
            continue
        if _is_fixed(field):
            fixed.append(f"{field} (checkpoint {a!r}, now {b!r})")
        else:
            knobs.append(f"{field} {a!r} -> {b!r}")
    return fixed, knobs


def evaluation_config(saved, current) -> ml_collections.ConfigDict:
    """The config that evaluates or exports a checkpoint: the checkpoint's own (model, data,
    seed ...: what the weights were trained with, and what the synthetic evaluation faces
    derive from) with the current config's RUNTIME_SECTIONS. Fields the checkpoint predates
    are filled in (core/defaults.upgrade), so code that reads them works on old checkpoints."""
    config = upgrade(saved)
    for section in RUNTIME_SECTIONS:
        if section in current:
            config[section] = copy.deepcopy(current[section])
    return config


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
    def __init__(self, workdir: str, every_steps: int, max_to_keep: int, create: bool = True):
        if every_steps < 1:
            raise ValueError(f"config.checkpoint.every_steps={every_steps} must be >= 1")
        self.every_steps = every_steps
        # Orbax needs an absolute path; users type relative ones (--workdir runs/demo). A URL
        # (gs://...) stays a URL: nothing local is created from it.
        self.workdir = workdir_path(workdir)
        self.directory = self.workdir / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
        )
        self.save_seconds = []  # (step, blocking seconds of save(), seconds until committed)
        self._pending = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def saved_config(self, step: int) -> dict:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    def latest_saved_config(self) -> tuple[int, dict] | None:
        """(step, config) of the newest step whose saved config reads; None when none does
        (restore_latest then says which steps are unreadable)."""
        for step in reversed(self.steps()):
            try:
                return step, self.saved_config(step)
            except Exception:  # noqa: BLE001 - restore_latest reports and moves it aside
                continue
        return None

    def save(self, step: int, state, data_iterator, config, loop_state: dict | None = None):
        if step in self.manager.all_steps():
            return
        self._finish_pending()
        items = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(_config_dict(config)),
            loop=ocp.args.JsonSave(dict(loop_state or {})),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        t0 = time.perf_counter()
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._pending = (step, t0, time.perf_counter() - t0)
        logging.info("Saving checkpoint at step %d to %s", step, self.directory)

    def poll(self) -> None:
        """Records when the last save committed (called once per step; cheap)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self._finish_pending()

    def _finish_pending(self):
        """Waits for the last save to commit and records its times; a failed async save raises
        here (never swallowed)."""
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
        if self._pending is not None:
            step, t0, blocking = self._pending
            self.save_seconds.append((step, blocking, time.perf_counter() - t0))
            self._pending = None

    def restore(self, step: int, abstract_state, data_iterator=None):
        """State restored into the shardings of `abstract_state`; the iterator is moved in place."""
        state, _ = self._restore(step, abstract_state, data_iterator)
        return state

    def _restore(self, step: int, abstract_state, data_iterator=None):
        fields, fill = state_restore_target(abstract_state, self.directory / str(step) / "state")
        items = dict(state=ocp.args.StandardRestore(fields))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        step_dir = self.directory / str(step)
        has_loop = (step_dir / "loop").exists()
        if has_loop:
            items["loop"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return fill(restored["state"]), (dict(restored["loop"]) if has_loop else {})

    def restore_latest(self, abstract_state, data_iterator, config, report_changes=True):
        """(state, step, loop_state) from the newest readable checkpoint, or None when there is
        none. Unreadable steps are skipped (one warning each) and moved aside; a checkpoint of
        another architecture or data is refused (CheckpointError naming the fields). With
        report_changes, one line lists the training knobs changed since the checkpoint."""
        steps = self.steps()
        skipped = []
        result = None
        for step in reversed(steps):
            where = self.directory / str(step)
            try:
                saved = self.saved_config(step)
            except Exception as e:  # noqa: BLE001 - any failure to read means unusable
                skipped.append(step)
                messages.warning(
                    f"checkpoint {where} is unreadable, skipping it ({_first_line(e)})"
                )
                continue
            fixed, knobs = config_changes(saved, config)
            if fixed:
                raise CheckpointError(
                    f"--workdir={self.workdir} holds checkpoints of another model or data "
                    f"(step {step}): {'; '.join(fixed)}; use a new workdir (or "
                    "--config.init_from to start from it)"
                )
            try:
                state, loop_state = self._restore(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001
                skipped.append(step)
                messages.warning(
                    f"checkpoint {where} is unreadable, skipping it ({_first_line(e)})"
                )
                continue
            if knobs and report_changes:
                print(
                    f"config changes since the checkpoint at step {step}: {'; '.join(knobs)}",
                    flush=True,
                )
            result = (state, step, loop_state)
            break
        if steps and result is None:
            raise CheckpointError(
                f"no checkpoint in {self.directory} is readable (steps {steps}); move them "
                "aside to start again from scratch"
            )
        if skipped:
            self._move_aside(skipped)
            if result is not None:
                print(f"restored step {result[1]} instead (skipped {skipped})", flush=True)
        return result

    def _move_aside(self, steps):
        """Unreadable steps go to checkpoints_corrupt/ so later saves of those steps succeed."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("facemoe_checkpoint_move_aside")
        if jax.process_index() == 0:
            aside = self.workdir / "checkpoints_corrupt"
            for step in steps:
                source = self.directory / str(step)
                target = aside / f"{step}.{int(time.time())}"
                try:
                    aside.mkdir(parents=True, exist_ok=True)
                    source.rename(target)
                except OSError as e:
                    messages.warning(
                        f"could not move {source} aside ({_first_line(e)}); deleting it"
                    )
                    self.manager.delete(step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("facemoe_checkpoint_moved_aside")
        self.manager.reload()

    def wait(self):
        self._finish_pending()

    def close(self):
        self._finish_pending()
        self.manager.close()


def state_restore_target(abstract_state, state_dir):
    """(target, fill): the restore target for a TrainState checkpoint in `state_dir`, and the
    function that turns what was restored into the state.

    The target asks only for what the checkpoint holds. An objective's aux entry (train/state.py)
    that this run needs and the checkpoint lacks is an error naming it (the config check refuses
    such a resume first; this guards the rest); one the checkpoint holds and this run does not
    use is not read. A checkpoint written before `aux` existed holds the same arrays under the
    old top-level names (state.LEGACY_AUX_FIELDS): they are read from there."""
    # The item's handler reads the item's own _METADATA. A Checkpointer would also look for a
    # step-level _CHECKPOINT_METADATA inside the item folder, where Orbax never writes one,
    # and log "Metadata file does not exist" on stderr at every restore.
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(epath.Path(state_dir))
    finally:
        handler.close()
    tree = getattr(metadata, "tree", metadata)
    held = set(tree.keys())
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    aux = fields.pop("aux")
    # Where each aux entry of this run is in the checkpoint: ("aux", name) or a legacy path.
    legacy = {path[0]: (field, path[1:]) for field, path in LEGACY_AUX_FIELDS.items()}
    held_aux = set(tree["aux"].keys()) if "aux" in held else set()
    missing = sorted(name for name in fields if name not in held)
    places = {}
    for name in aux:
        if name in held_aux:
            places[name] = ("aux", name)
        elif name in legacy and legacy[name][0] in held:
            places[name] = legacy[name]
        else:
            missing.append(f"aux/{name}")
    if missing:
        raise CheckpointError(
            f"checkpoint {state_dir} has no {', '.join(missing)}: it was written by a run "
            "without them"
        )
    target = dict(fields)
    if "aux" in held:
        target["aux"] = {}
    for name, (top, rest) in places.items():
        if top == "aux":
            target["aux"][name] = aux[name]
        else:  # a legacy field held the entry's subtree at `rest`
            target[top] = _unnest(rest, aux[name])
    # Orbax restores the whole tree the checkpoint holds: what this run does not use is read
    # as it was written (on this host's first device) and dropped.
    for name in held - set(target):
        target[name] = _as_written(tree[name])
    for name in held_aux - set(target.get("aux", {})):
        target["aux"][name] = _as_written(tree["aux"][name])

    def fill(restored):
        restored = dict(restored)
        entries = {}
        for name, (top, rest) in places.items():
            entries[name] = restored["aux"][name] if top == "aux" else _nest(rest, restored[top])
        values = {name: restored[name] for name in fields}
        return abstract_state.replace(aux=entries, **values)

    return target, fill


def _as_written(metadata):
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(entry):
        return jax.ShapeDtypeStruct(entry.shape, entry.dtype, sharding=device)

    return jax.tree.map(leaf, metadata)


def _nest(path, value):
    for key in reversed(path):
        value = {key: value}
    return value


def _unnest(path, value):
    for key in path:
        value = value[key]
    return value


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that also name where each restored array must live."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


def restore_params(workdir: str, step: int | None = None):
    """(config, params, batch_stats, step) of a workdir's checkpoint (latest by default),
    restored onto this host's first device with the config saved beside it.

    params holds the encoder and the classifier ({"encoder": ..., "classifier": {"centers"}}).
    The optimiser is rebuilt from the saved config (its trainable set included) only to give
    the restore its target structure.
    """
    from facemoe_jax.models import build_model
    from facemoe_jax.train import optimizer as optimizer_lib
    from facemoe_jax.train import state as state_lib

    directory = workdir_path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ValueError(f"{workdir} has no checkpoints/ folder")
    manager = ocp.CheckpointManager(directory)
    try:
        steps = manager.all_steps()
        if step is None:
            step = manager.latest_step()
        if step is None or step not in steps:
            raise ValueError(
                f"{directory} holds no checkpoint{'' if step is None else f' at step {step}'} "
                f"(steps: {sorted(steps)})"
            )
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        config = upgrade(saved["config"])
        model = build_model(config.model)
        optimizer, _ = optimizer_lib.build_optimizer(
            config.optimizer, config.train.num_steps, config.train.trainable
        )
        abstract = state_lib.abstract_train_state(model, optimizer, config)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
        fields, fill = state_restore_target(target, directory / str(step) / "state")
        restored = fill(
            manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(fields)))[
                "state"
            ]
        )
    finally:
        manager.close()
    return config, restored.params, restored.batch_stats, step
