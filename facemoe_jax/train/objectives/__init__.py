"""The registered training objectives, in the order the step sums their losses.

A new method is one module here with an `Objective` subclass (objectives/base.py) and one
`register` call (or one line in REGISTERED); the step, the loop, the state and the checkpoint
code do not change.
"""

from __future__ import annotations

from facemoe_jax.train.objectives.base import Forward, Objective, Resources, StepContext
from facemoe_jax.train.objectives.cross_resolution import CrossResolutionObjective
from facemoe_jax.train.objectives.distill import DistillObjective
from facemoe_jax.train.objectives.margin import MarginObjective
from facemoe_jax.train.objectives.quality import QualityObjective
from facemoe_jax.train.objectives.recognizability import RecognizabilityObjective
from facemoe_jax.train.objectives.router import RouterObjective

__all__ = ["Forward", "Objective", "Resources", "StepContext", "REGISTERED", "register"]

REGISTERED: list[type[Objective]] = [
    MarginObjective,
    RouterObjective,
    DistillObjective,
    RecognizabilityObjective,
    QualityObjective,
    CrossResolutionObjective,
]


def register(objective: type[Objective]) -> type[Objective]:
    """Adds an objective after the registered ones (usable as a class decorator)."""
    if not objective.name or any(o.name == objective.name for o in REGISTERED):
        raise ValueError(f"objective name {objective.name!r} is empty or already registered")
    REGISTERED.append(objective)
    return objective


def check_config(config) -> None:
    for objective in REGISTERED:
        objective.check_config(config)


def active(config) -> list[type[Objective]]:
    return [objective for objective in REGISTERED if objective.active(config)]


def initial_aux(config, num_rows: int) -> dict:
    """TrainState.aux of a fresh state: each active objective's initial entry (None: none)."""
    aux = {}
    for objective in active(config):
        value = objective.init_aux(config, num_rows)
        if value is not None:
            aux[objective.name] = value
    return aux


def build(config, resources: Resources | None = None) -> list[Objective]:
    """The active objectives of a run, with their frozen inputs loaded."""
    return [objective(config, resources) for objective in active(config)]


def batch_keys(objectives) -> tuple[str, ...]:
    """Batch entries besides "image" and "label" the objectives need, in a fixed order."""
    return tuple(sorted({key for objective in objectives for key in objective.batch_keys}))


def frozen_inputs(objectives) -> dict:
    """{name: frozen arrays} for the objectives that have any (the step's third argument)."""
    frozen = {}
    for objective in objectives:
        value = objective.frozen()
        if value is not None:
            frozen[objective.name] = value
    return frozen
