"""Which parameters a run trains: `config.train.trainable`, regexes over parameter paths.

A parameter's path is its place in `state.params`, e.g. `encoder/blocks_1/moe/experts/fc1_kernel`
or `classifier/centers` (the same names as the sharding rules, without the `params/` prefix). A
parameter trains when any pattern `re.search`es its path; the rest are frozen: the optimiser
keeps no state for them and the train step leaves them bit-identical (`optimizer.py`, `step.py`).

Recipes name what they adapt: `(".*",)` (everything, the default), `("^classifier/",)` (FaceMoE's
classifier-only stage), `("lora", "^classifier/")` (adapters and head). A pattern that matches no
parameter is an error, so a typo cannot silently freeze the whole model.
"""

from __future__ import annotations

import re
from typing import Any

import jax

from facemoe_jax.parallel.sharding import path_name

ALL = (".*",)


def parse_patterns(patterns) -> tuple[str, ...]:
    """config.train.trainable (a tuple, or a comma string from the command line) -> patterns."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    patterns = tuple(str(p).strip() for p in (patterns or ALL))
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"config.train.trainable: {pattern!r} is not a regex ({e})") from None
    return patterns


def trainable_mask(params: Any, patterns) -> Any:
    """A tree of Python bools shaped like `params`: True where the parameter trains.

    Raises ValueError naming the pattern when a pattern matches no parameter.
    """
    patterns = parse_patterns(patterns)
    compiled = [re.compile(p) for p in patterns]
    matched = [False] * len(compiled)

    def label(path, _):
        name = path_name(path)
        hit = False
        for i, regex in enumerate(compiled):
            if regex.search(name):
                matched[i] = hit = True
        return hit

    mask = jax.tree_util.tree_map_with_path(label, params)
    unmatched = [p for p, m in zip(patterns, matched) if not m]
    if unmatched:
        examples = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)[:3]]
        raise ValueError(
            f"config.train.trainable pattern(s) {unmatched} match no parameter "
            f"(paths look like {examples})"
        )
    return mask


def trains_everything(patterns) -> bool:
    return parse_patterns(patterns) == ALL


def trainable_count(params: Any, mask: Any) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    total = trained = 0
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
        total += int(p.size)
        trained += int(p.size) if m else 0
    return trained, total


def frozen_module_paths(params: Any, mask: Any) -> set[str]:
    """Module paths (e.g. 'encoder/feature_bn1') all of whose parameters are frozen."""
    trains: dict[str, bool] = {}
    for (path, _), m in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask)):
        module = path_name(path).rsplit("/", 1)[0]
        trains[module] = trains.get(module, False) or bool(m)
    return {module for module, t in trains.items() if not t}


def select(mask: Any, if_true: Any, if_false: Any) -> Any:
    """Leaf-wise `if_true if mask else if_false` with a static (Python bool) mask."""
    return jax.tree.map(lambda m, a, b: a if m else b, mask, if_true, if_false)
