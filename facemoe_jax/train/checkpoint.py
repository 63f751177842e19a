"""Orbax checkpoints of the train state, the data-iterator position and the config.

A checkpoint step holds three items: `state` (params, optimiser, step, RNG, margin state, as
arrays), `data` (the grain iterator state of this host, one JSON file per process) and `config`
(JSON, for humans and for export). Restoring targets abstract arrays that carry the current
mesh's shardings, so a run can continue on a different device layout.
"""

import json
import logging
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    def __init__(self, workdir: str, every_steps: int, max_to_keep: int):
        if every_steps < 1:
            raise ValueError(f"config.checkpoint.every_steps={every_steps} must be >= 1")
        self.every_steps = every_steps
        # Orbax needs an absolute path; users type relative ones (--workdir runs/demo).
        self.directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict):
        if step in self.manager.all_steps():
            return
        items = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items))
        logging.info("Saved checkpoint at step %d to %s", step, self.directory)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """State restored into the shardings of `abstract_state`; the iterator is moved in place."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


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

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
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
        config = ml_collections.ConfigDict(saved["config"])
        model = build_model(config.model)
        optimizer, _ = optimizer_lib.build_optimizer(
            config.optimizer, config.train.num_steps, config.train.get("trainable")
        )
        abstract = state_lib.abstract_train_state(model, optimizer, config)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
    finally:
        manager.close()
    return config, restored.params, restored.batch_stats, step
