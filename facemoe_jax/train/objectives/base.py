"""What a training objective is: one term of the loss, with everything it needs declared.

The train step (train/step.py) runs one forward pass of the model and sums the active objectives'
losses. An objective states what it needs beyond that forward pass, and the step, the loop, the
state and the checkpoint serve it without knowing what it is:

- `batch_keys`: batch entries besides "image" and "label" (e.g. "image_hr", the geometry-only
  copy of each image that the paired pipeline adds, or "record", each image's source index);
- `frozen`: arrays the step takes as an argument but never trains or saves (a distillation
  teacher), placed on the mesh once per start;
- `init_aux`: its persistent state, kept in `TrainState.aux[name]` and checkpointed with the
  rest; a state leaf under a "per_class" key has one row per class-centre row and is split
  like the centres.

Per step: `prepare` runs before the gradient (no gradient flows through it; it may advance its
aux entry and add batch entries), then `loss` runs inside the differentiated function and
returns (loss, metrics, new aux entry). A step whose loss or gradient is not finite keeps the
aux entries as they were before `prepare`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Static facts of the run every objective may read (fixed at trace time)."""

    model: Any
    config: ml_collections.ConfigDict
    class_axes: tuple[str, ...]  # mesh axes the class centres are split over


@dataclasses.dataclass(frozen=True)
class Forward:
    """The step's one training-mode forward pass of the model."""

    images: jax.Array  # the batch normalised to [-1, 1]
    embeddings: jax.Array  # (B, D) raw, in the model's output dtype
    router_metrics: dict  # per-MoE-block router statistics (empty for dense models)
    dropout_rng: jax.Array
    sample_rng: jax.Array  # Partial FC's class sampling


@dataclasses.dataclass(frozen=True)
class Resources:
    """What an objective may use to build its frozen inputs at the start of a run."""

    mesh: Any
    # path, config=None, *, field=... -> an object with .origin, .config, .variables: the one
    # loader (interop/load.py), passed in from above train/ (train/ never imports it).
    load_variables: Callable | None = None
    source: Any = None  # the run's training source (random access), for per-record tables


class Objective:
    """Base class: an objective that needs nothing and adds nothing. Subclasses override."""

    name: str = ""

    # ---- static: decided from the config alone (the state's shape depends on them) ----
    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Errors a user can fix, naming the field; runs for every registered objective."""

    @classmethod
    def active(cls, config: ml_collections.ConfigDict) -> bool:
        return False

    @classmethod
    def init_aux(cls, config: ml_collections.ConfigDict, num_rows: int):
        """The initial `TrainState.aux[name]` (a pytree of arrays), or None for none.
        num_rows: class-centre rows (padded class count)."""
        return None

    # ---- per run ----
    def __init__(self, config: ml_collections.ConfigDict, resources=None):
        self.config = config

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ()

    def frozen(self):
        """Frozen arrays the step receives as `frozen[name]`, already placed; None for none."""
        return None

    def describe(self) -> str | None:
        """One line for the run's start, or None."""
        return None

    # ---- per step (traced) ----
    def prepare(self, ctx: StepContext, state, batch: dict, frozen):
        """(new aux entry, batch) before the gradient; default: unchanged."""
        return state.aux.get(self.name), batch

    def loss(self, ctx: StepContext, params, state, batch: dict, forward: Forward, frozen):
        """(scalar float32 loss, metrics dict, new aux entry) inside the differentiated function.
        `state.aux` holds every objective's entry after `prepare`."""
        raise NotImplementedError
