"""One loader: any path that holds a face model -> its variables (`load_variables`).

The forms it reads:
  a workdir, `W/checkpoints` (latest step) or `W/checkpoints/STEP`  the Orbax checkpoint, with the
      config saved in it (train/checkpoint.restore_params) and the class centres;
  an export folder (`W/export`, from `--mode=export`)  its config.json names the architecture;
      model.onnx of an imported ONNX run, else model.safetensors, else model.pt;
  a PyTorch file (.pt/.pth/.safetensors: our exports, FaceMoE's model.pt or checkpoint_gpu_0.pt,
      arcface_torch's and dense insightface ViTs)  the architecture is `config.model`, else the
      export's config.json beside the file;
  an ONNX file  the graph is the architecture (config None or config.model.name "onnx"), or
      with a config of another architecture its initializers are read as that state_dict.

Its users: `FaceEncoder.from_checkpoint`, the distillation teacher (`config.distill.teacher`)
and `config.init_from`; `field` names the setting the path came from in every error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import ml_collections
import numpy as np

from facemoe_jax.core import defaults
from facemoe_jax.models import build_model, onnx_graph, onnx_model_config, registry
from facemoe_jax.models import quality as quality_lib
from facemoe_jax.models.lora import settings_from_config

EXPORT_CONFIG = "config.json"
EXPORT_FILES = ("model.safetensors", "model.pt")  # in an export folder, in this order
LORA_KEY = ".trainable_lora_"  # in the PyTorch names of the adapters (interop/torch_models.py)


@dataclasses.dataclass
class Loaded:
    """What `load_variables` found.

    origin: the path as given, with "(step N)" for a checkpoint (for messages).
    config: the run config saved in a checkpoint; for a file, `config` as passed, or one with
      only "model" (the export's config.json, or the ONNX graph's own config.model).
    variables: {"params": the encoder's parameters, "batch_stats": ...}.
    class_centers: (classes, embed_dim) of a checkpoint's classifier (its real rows, padding
      dropped) or of a PyTorch training checkpoint's Partial FC; None when the source has none.
    step: the checkpoint's step; None for files.
    """

    origin: str
    config: ml_collections.ConfigDict
    variables: dict
    class_centers: np.ndarray | None = None
    step: int | None = None


def load_variables(
    path: str,
    config: ml_collections.ConfigDict | None = None,
    *,
    field: str = "config.init_from",
    config_hint: str = "pass the run config that names its architecture",
    upcycle: bool = False,
    seed: int = 0,
    lora_optional: bool = False,
) -> Loaded:
    """The model at `path` (see the module docstring for the forms) as a `Loaded`.

    config: a run config; only config.model is read, the architecture of a PyTorch file (and of
      the ONNX initializers when it is not "onnx"); optional where the path names its own.
    field: the setting `path` came from, named in errors ("config.distill.teacher", ...).
    config_hint: what the error for a PyTorch file without an architecture suggests.
    upcycle, seed: PyTorch files only: MoE experts the file lacks are copied from the block's
      dense MLP and missing routers start at N(0, 1e-3^2), drawn with `seed`
      (interop/convert.torch_to_jax).
    lora_optional: PyTorch files only: a file without LoRA tensors feeding a config.model with
      adapters is converted as that model without adapters (lora.rank=0), the frozen HR weights
      PETALface starts from; without it, such a file is an error.
    """
    if not os.path.exists(path):
        raise ValueError(f"{field}={path!r} does not exist")
    if is_run_directory(path):
        workdir, step = split_run_path(path, field)
        saved, params, batch_stats, step = restore_params(workdir, step)
        centers = None
        if "classifier" in params:  # padded to a multiple of the devices: keep the real rows
            centers = np.asarray(params["classifier"]["centers"])[: saved.data.num_classes]
        variables = {"params": params["encoder"], "batch_stats": batch_stats}
        return Loaded(f"{path} (step {step})", saved, variables, centers, step)
    options = dict(
        field=field,
        config_hint=config_hint,
        upcycle=upcycle,
        seed=seed,
        lora_optional=lora_optional,
    )
    if os.path.isdir(path):
        exported = os.path.join(path, EXPORT_CONFIG)
        if config is None and os.path.isfile(exported):
            config = read_export_config(exported)
        graph = config is not None and registry.spec(config.model.name).export == "graph"
        for name in (("model.onnx",) if graph else ()) + EXPORT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return load_variables(os.path.join(path, name), config, **options)
        raise ValueError(f"{path} holds neither checkpoints/ nor model.safetensors/model.pt")
    if path.endswith(".onnx"):
        config, variables = load_onnx(path, config)
        return Loaded(path, config, variables)
    if config is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), EXPORT_CONFIG)
        if not os.path.isfile(beside):
            raise ValueError(
                f"{field}={path!r} is a file without an export {EXPORT_CONFIG} beside it: "
                f"{config_hint}"
            )
        config = read_export_config(beside)
    from facemoe_jax.interop import convert

    state, extras = convert.load_state_dict_file(path)
    model_cfg = config.model
    if (
        lora_optional
        and settings_from_config(model_cfg) is not None
        and not any(LORA_KEY in k for k in state)
    ):
        model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        model_cfg.lora.rank = 0
    variables = convert.torch_to_jax(model_cfg, state, upcycle=upcycle, seed=seed)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return Loaded(path, config, variables, extras.get("classifier_centers"))


# ------------------------------------------------------------------------------------------------
# Run directories


def is_run_directory(path: str) -> bool:
    """A workdir, its checkpoints/ folder, or one checkpoint step inside it."""
    path = os.path.abspath(path)
    return (
        os.path.isdir(os.path.join(path, "checkpoints"))
        or os.path.basename(path) == "checkpoints"
        or (os.path.basename(os.path.dirname(path)) == "checkpoints" and os.path.isdir(path))
    )


def split_run_path(path: str, field: str = "config.init_from") -> tuple[str, int | None]:
    """(workdir, step or None for the latest) of a run directory path."""
    path = os.path.abspath(path)
    if os.path.basename(path) == "checkpoints":
        return os.path.dirname(path), None
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints":
        try:
            return os.path.dirname(parent), int(os.path.basename(path))
        except ValueError:
            raise ValueError(
                f"{field}={path!r}: {os.path.basename(path)!r} is not a checkpoint step"
            ) from None
    return path, None


def restore_params(workdir: str, step: int | None = None):
    """train/checkpoint.restore_params: (config, params, batch_stats, step); Orbax is imported
    only when a checkpoint is read."""
    from facemoe_jax.train.checkpoint import restore_params as restore

    return restore(workdir, step)


def restore_workdir(workdir: str, step: int | None = None):
    """(config, {"params", "batch_stats"} of the encoder, step) of a workdir's checkpoint (latest
    by default); `workdir` may be a URL (the export's remote workdirs)."""
    config, params, batch_stats, step = restore_params(workdir, step)
    return config, {"params": params["encoder"], "batch_stats": batch_stats}, step


# ------------------------------------------------------------------------------------------------
# Files


def read_export_config(path: str) -> ml_collections.ConfigDict:
    """The run config stored by `--mode=export` (its "model" entry builds the encoder)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: the export's {EXPORT_CONFIG} names the architecture")
    with open(path) as f:
        exported = json.load(f)
    # An export of an earlier version lacks the fields added since: filled as for checkpoints.
    return ml_collections.ConfigDict(
        {"model": defaults.upgrade({"model": exported["model"]}).model}
    )


def load_onnx(path: str, config: ml_collections.ConfigDict | None = None):
    """(config, variables) of an ONNX file: the graph as a model of its own (config None or
    config.model.name "onnx": its onnx_* fields are kept, onnx_path becomes `path`), or the
    initializers as the state_dict of config.model's architecture."""
    graph = onnx_graph.load_graph(path)
    if config is not None and registry.spec(config.model.name).export != "graph":
        from facemoe_jax.interop import convert

        state = {**graph.params, **graph.statistics, **graph.constants}
        return config, convert.torch_to_jax(config.model, state)
    fields = {}
    if config is not None:
        keep = ("onnx_input_mean", "onnx_input_std", "onnx_channel_order")
        fields = {k: config.model[k] for k in keep if k in config.model}
    model_cfg = onnx_model_config(path, **fields)
    return ml_collections.ConfigDict({"model": model_cfg}), onnx_graph.onnx_variables(graph)


# ------------------------------------------------------------------------------------------------
# config.model.lora.quality="recognizability:WORKDIR": registered here, where models are loaded
# (the command line's runs and FaceEncoder both import this module).


@functools.cache
def _recognizability_estimator(workdir: str):
    """The quality head of the model at `workdir` as PETALface's quality estimator."""
    field = f"config.model.lora.quality={quality_lib.RECOGNIZABILITY + workdir!r}"
    if not os.path.exists(workdir):
        raise ValueError(
            f"{field}: {workdir} does not exist (a workdir of a run with "
            "config.model.quality_head, its checkpoints/ or an export)"
        )
    try:
        loaded = load_variables(workdir, field=field)
        model = build_model(loaded.config.model)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}: cannot load a model from {workdir}: {e}") from None
    variables = {
        "params": loaded.variables["params"],
        "batch_stats": loaded.variables.get("batch_stats", {}),
    }
    try:
        return quality_lib.head_score(model, variables, int(loaded.config.model.image_size))
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


quality_lib.register_estimator_prefix(quality_lib.RECOGNIZABILITY, _recognizability_estimator)
