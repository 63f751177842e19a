"""Start a run from earlier weights: `config.init_from` = one of our runs or a PyTorch file.

Low-resolution adaptation starts from a model pre-trained at high resolution, and the adapted
model often has a different shape: new heads, adapters, MoE experts where the source had a dense
MLP. So the source's weights are merged into the freshly initialised state by parameter path:

  * a parameter both have is copied; a shape mismatch is an error naming the path and both shapes;
  * MoE experts the source lacks are *upcycled* from the same block's dense MLP when the source
    has one (every expert starts as a copy: `blocks_1/moe/experts/fc1_kernel` (E, D, H) from
    `blocks_1/mlp/fc1/kernel` (D, H)), the sparse-upcycling recipe;
  * anything else the source lacks (routers, adapters, heads) keeps its initialiser;
  * source parameters the new model does not use are ignored.
One line lists what was new and what was unused, so a typo in an architecture field shows.

The class centres come along only with `config.init_classifier` and when the source has the same
number of classes and embedding size (FaceMoE's second stage continues from its classifier-only
stage); otherwise the classifier starts fresh, as a new data set has new identities.

`config.init_from` accepts a workdir (its latest checkpoint), `W/checkpoints` or
`W/checkpoints/STEP` (that step), or a PyTorch file (`export/workdir.py`: our exports, the
official FaceMoE `model.pt` / `checkpoint_gpu_0.pt`, dense insightface ViTs).
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import traverse_util

_EXPERT_LEAF = re.compile(
    r"^(?P<block>.*)/(moe|mlp)/experts/(?P<layer>fc\d)_(?P<kind>kernel|bias)$"
)


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def merge_by_path(target: dict, source: dict, what: str, origin: str):
    """(merged flat dict, new paths, upcycled paths, unused source paths).

    target: flat {path: array} of the new model (its initial values); source: flat {path: array}.
    """
    merged, new, upcycled = {}, [], []
    used = set()
    for path, init in target.items():
        value = source.get(path)
        if value is None:
            match = _EXPERT_LEAF.match(path)
            dense = None
            if match:
                dense = f"{match['block']}/mlp/{match['layer']}/{match['kind']}"
                value = source.get(dense)
            if value is not None:
                value = np.broadcast_to(np.asarray(value), init.shape)
                upcycled.append(path)
                used.add(dense)
            else:
                merged[path] = init
                new.append(path)
                continue
        else:
            used.add(path)
        if tuple(np.shape(value)) != tuple(init.shape):
            raise ValueError(
                f"config.init_from={origin}: {what} {path} has shape {tuple(np.shape(value))} "
                f"there but {tuple(init.shape)} in this model (config.model)"
            )
        merged[path] = value
    unused = sorted(set(source) - used)
    return merged, new, upcycled, unused


def _place(value, like):
    """`value` as an array with `like`'s dtype and sharding."""
    if value is like:
        return like
    return jax.device_put(np.asarray(value, like.dtype), like.sharding)


def _summary(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}{', ...' if len(names) > limit else ''} ({len(names)})"


def _unflatten_onto(flat: dict, like):
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return jax.tree.map(_place, tree, like)


def initialize_from(state, config, load_variables):
    """`state` (freshly initialised, sharded) with the weights of `config.init_from` merged in.

    load_variables: the one loader (interop/load.py), passed in from above train/. A PyTorch
    file is converted into this run's config.model layout, with MoE experts upcycled from dense
    MLPs, and a file without adapters feeds an adapter model's frozen weights (an HR model is
    where PETALface starts)."""
    path = str(config.init_from)
    if load_variables is None:
        raise ValueError(f"config.init_from={path!r} is set, but the run has no weight loader")
    loaded = load_variables(path, config, upcycle=True, seed=config.seed, lora_optional=True)
    origin, centers = loaded.origin, loaded.class_centers
    encoder_src = loaded.variables["params"]
    stats_src = loaded.variables.get("batch_stats", {})
    shape = None if centers is None else tuple(np.shape(centers))

    encoder, new, upcycled, unused = merge_by_path(
        _flat(state.params["encoder"]), _flat(encoder_src), "parameter", origin
    )
    stats, new_stats, _, unused_stats = merge_by_path(
        _flat(state.batch_stats), _flat(stats_src), "batch statistic", origin
    )
    params = dict(state.params)
    params["encoder"] = _unflatten_onto(encoder, state.params["encoder"])
    batch_stats = _unflatten_onto(stats, state.batch_stats) if stats else state.batch_stats

    classifier_note = "fresh classifier"
    if config.init_classifier:
        ours = (config.data.num_classes, config.model.embed_dim)
        if centers is not None and tuple(shape) == ours:
            n = config.data.num_classes
            merged = np.asarray(state.params["classifier"]["centers"]).copy()
            merged[:n] = np.asarray(centers)[:n]
            params["classifier"] = {
                "centers": _place(merged, state.params["classifier"]["centers"])
            }
            classifier_note = f"class centres loaded ({n} classes)"
        elif centers is None:
            classifier_note = "fresh classifier (the source has no class centres)"
        else:
            classifier_note = (
                f"fresh classifier (source has {shape[0]} classes x {shape[1]}, this run "
                f"{ours[0]} x {ours[1]})"
            )
    parts = [
        f"initialised from {origin}: {len(encoder) - len(new)}/{len(encoder)} encoder arrays",
        classifier_note,
    ]
    if upcycled:
        parts.append(f"upcycled from dense MLPs: {_summary(upcycled)}")
    if new or new_stats:
        parts.append(f"new (from their initialisers): {_summary(new + new_stats)}")
    if unused or unused_stats:
        parts.append(f"unused from the source: {_summary(unused + unused_stats)}")
    print("; ".join(parts), flush=True)
    return state.replace(params=params, batch_stats=batch_stats)
