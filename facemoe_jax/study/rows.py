"""A row of the low-resolution adaptation study: what it starts from and how it changes the
adaptation config.

Adding a row = registering a `Recipe` in its suite's registry (a name, its start, how it
configures the run); the study's loop (`runner.py`) does not change.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

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


def register(recipe: Recipe, registry: dict[str, Recipe]) -> Recipe:
    """Adds `recipe` to `registry` (a suite's RECIPES)."""
    if recipe.name in registry:
        raise ValueError(f"a study recipe named {recipe.name!r} is already registered")
    registry[recipe.name] = recipe
    return recipe
