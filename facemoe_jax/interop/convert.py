"""JAX variables <-> PyTorch state_dicts: our ViT-MoE, the official Swin-MoE, insightface's CNNs.

One table of rules maps every leaf of the Flax variables to its PyTorch name(s) and layout; the
same rules run in both directions, so export and import cannot drift apart:

  module names   layers_0/blocks_1 -> layers.0.blocks.1, moe -> mlp, head names per architecture
  Dense kernel   (in, out)            -> weight (out, in)          transposed
  Conv kernel    (kh, kw, in, out)    -> weight (out, in, kh, kw)  HWIO -> OIHW
  LayerNorm      scale, bias          -> weight, bias
  BatchNorm      scale, bias / mean, var (batch_stats) -> weight, bias / running_mean, running_var
  experts        stacked (E, ...)     -> experts.{e}.fc1.weight ... one entry per expert
  PReLU          negative_slope (C,)  -> weight (C,)
  CNN modules    layer1_0/downsample_1 -> layer1.0.downsample.1, layers_3 -> layers.3 (IResNet,
                 MobileFaceNet: the Flax names are arcface_torch's with "_" before an index)

Buffers PyTorch keeps but our model computes from its shapes (`relative_position_index`,
`attn_mask` of shifted Swin windows, BatchNorm `num_batches_tracked`, IResNet's `features.weight`,
a constant 1 in arcface_torch) are written on export and checked on import: a checkpoint whose
window geometry differs from the config is an error, not a silent mismatch. Arrays are numpy
here; torch is imported only to read and write .pt files.

Importing also *upcycles* a dense checkpoint (insightface/PETALface ViT naming, `mlp.fc1`...):
with `upcycle=True`, an MoE block whose experts are missing copies the dense MLP into every
expert and starts its router at N(0, router_init_std^2). With zero router weights and a combine
rule whose weights sum to 1 (`softmax_topk`), the MoE model computes exactly the dense model.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from facemoe_jax.models import build_model, registry
from facemoe_jax.models import swin as swin_geometry
from facemoe_jax.models.lora import settings_from_config

# arcface_torch CNN module names (ModelSpec.indexed_names): layer1_0 -> layer1.0.
INDEXED = re.compile(r"^(\w+?)_(\d+)$")
LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
    "negative_slope": "weight",  # PReLU
}
# Dense-checkpoint entries an import may drop: insightface's unused masked-autoencoder token.
IGNORED_KEYS = re.compile(r"^mask_token$")
log = logging.getLogger(__name__)
CHECKPOINT_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def abstract_variables(model_cfg: ml_collections.ConfigDict) -> dict:
    """Shapes of {"params", "batch_stats"} of `build_model(model_cfg)`, without memory."""
    return _abstract_variables(model_cfg.to_json())


@functools.lru_cache(maxsize=8)
def _abstract_variables(model_cfg_json: str) -> dict:
    # Tracing the full-size Swin takes seconds; export and import of one config share it.
    model_cfg = ml_collections.ConfigDict(json.loads(model_cfg_json))
    model = build_model(model_cfg)
    size = model_cfg.image_size
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )


def _module_name(arch: str, part: str) -> str:
    spec = registry.spec(arch)
    if part in spec.head_names:
        return spec.head_names[part]
    if part == "moe":
        return "mlp"
    if spec.indexed_names:
        return INDEXED.sub(r"\1.\2", part)
    return re.sub(r"^(layers|blocks)_(\d+)$", r"\1.\2", part)


def _entries(arch: str, path: tuple[str, ...], shape: tuple[int, ...]) -> Iterator[tuple]:
    """(torch name, expert index or None, kind) of one Flax leaf; kind says the layout change."""
    *modules, leaf = path[1:]  # drop the collection
    prefix = ".".join(_module_name(arch, m) for m in modules)
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    if modules and modules[-1] == "experts":  # stacked (E, ...) expert weights
        layer, _, kind = leaf.partition("_")  # fc1_kernel -> fc1, kernel
        for e in range(shape[0]):
            name = join(f"{e}.{layer}.{LEAF_NAMES.get(kind, kind)}")
            yield name, e, "linear" if kind == "kernel" else "same"
        return
    name = join(LEAF_NAMES.get(leaf, leaf))
    if leaf == "kernel":
        yield name, None, "conv" if len(shape) == 4 else "linear"
    else:
        yield name, None, "same"


def _to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    return x


def _to_jax_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def geometry_buffers(model_cfg, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """The PyTorch buffers that follow from the config: window indices, shift masks, BN counters."""
    buffers = {}
    spec = registry.spec(model_cfg.name)
    if spec.indexed_names:
        flat = traverse_util.flatten_dict(abstract_variables(model_cfg)["batch_stats"])
        for path in flat:
            if path[-1] == "mean":
                name = ".".join(_module_name(model_cfg.name, m) for m in path[:-1])
                buffers[f"{name}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
        buffers.update(constant_entries(model_cfg))
        return buffers
    if spec.window_buffers:
        grid = model_cfg.image_size // model_cfg.patch_size
        depths = tuple(model_cfg.depths)
        for i, side in enumerate(swin_geometry.stage_resolutions(grid, len(depths))):
            window, shift = swin_geometry.effective_window(side, model_cfg.window_size)
            for j in range(depths[i]):
                block = f"layers.{i}.blocks.{j}"
                if shift and j % 2:
                    buffers[f"{block}.attn_mask"] = swin_geometry.shifted_window_mask(
                        side, window, shift
                    )
                buffers[f"{block}.attn.relative_position_index"] = (
                    swin_geometry.relative_position_index(window)
                )
    for bn in spec.head_batchnorms:
        name = spec.head_names[bn]
        buffers[f"{name}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return buffers


def constant_entries(model_cfg) -> dict[str, np.ndarray]:
    """Parameters PyTorch keeps that our model has as constants: IResNet's `features.weight`,
    frozen at 1 by arcface_torch (`requires_grad = False`), is a BatchNorm without scale here."""
    ones = registry.spec(model_cfg.name).constant_ones
    return {name: np.ones(model_cfg.embed_dim, np.float32) for name in ones}


def jax_to_torch(model_cfg, variables, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """Flax {"params", "batch_stats"} -> PyTorch state_dict (numpy arrays, float32 weights)."""
    arch = model_cfg.name
    state = {}
    flat = traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats")})
    for path, value in flat.items():
        value = np.asarray(jax.device_get(value), np.float32)
        for name, expert, kind in _entries(arch, path, value.shape):
            x = value if expert is None else value[expert]
            state[name] = np.ascontiguousarray(_to_torch_layout(x, kind))
    state.update(geometry_buffers(model_cfg, num_batches_tracked))
    return state


def torch_state_dict_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """Names and shapes an export of this config has, from `jax.eval_shape` (no memory)."""
    flat = traverse_util.flatten_dict(abstract_variables(model_cfg))
    shapes = {}
    for path, leaf in flat.items():
        for name, expert, kind in _entries(model_cfg.name, path, leaf.shape):
            shape = leaf.shape if expert is None else leaf.shape[1:]
            shapes[name] = _to_torch_layout(np.empty(shape, np.bool_), kind).shape
    shapes.update({k: v.shape for k, v in geometry_buffers(model_cfg).items()})
    return shapes


def _dense_source(name: str) -> str | None:
    """mlp.experts.{e}.fc1.weight -> mlp.fc1.weight (the dense MLP an expert upcycles from)."""
    dense = re.sub(r"\.mlp\.experts\.\d+\.", ".mlp.", name)
    return dense if dense != name else None


def torch_to_jax(
    model_cfg,
    state_dict: dict[str, Any],
    *,
    upcycle: bool = False,
    router_init_std: float = 1e-3,
    seed: int = 0,
) -> dict:
    """PyTorch state_dict -> Flax {"params", "batch_stats"} for `build_model(model_cfg)`.

    Every array must be consumed and every model leaf found, with matching shapes; errors name
    the key. `upcycle=True` fills missing experts from the block's dense MLP and missing routers
    with N(0, router_init_std^2) (seeded by `seed`).
    """
    arch = model_cfg.name
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    lora = sorted(k for k in state if "lora" in k)
    if lora and settings_from_config(model_cfg) is None:
        raise ValueError(
            f"checkpoint holds LoRA adapters ({lora[0]}, ...) but config.model.lora.rank=0: set "
            "config.model.lora (PETALface: rank 8, head=True) or merge them before import"
        )
    used = set()
    rng = np.random.default_rng(seed)
    upcycled_blocks = set()
    flat = traverse_util.flatten_dict(abstract_variables(model_cfg))
    out = {}
    for path, leaf in flat.items():
        parts = []
        for name, expert, kind in _entries(arch, path, leaf.shape):
            source = name
            if source not in state and upcycle and _dense_source(name) in state:
                source = _dense_source(name)
                upcycled_blocks.add(name.split(".mlp.")[0])
            if source not in state:
                if upcycle and name.endswith(".mlp.router.gate.weight"):
                    shape = leaf.shape[::-1]
                    parts.append((rng.normal(0.0, router_init_std, shape), kind))
                    continue
                raise ValueError(f"checkpoint has no {name!r} (needed for {'/'.join(path)})")
            used.add(source)
            parts.append((state[source].astype(np.float32), kind))
        arrays = [_to_jax_layout(x, kind) for x, kind in parts]
        stacked = path[-2] == "experts"  # one PyTorch entry per expert -> (E, ...)
        value = np.stack(arrays) if stacked else arrays[0]
        if value.shape != leaf.shape:
            names = [name for name, _, _ in _entries(arch, path, leaf.shape)]
            raise ValueError(
                f"checkpoint entry {names[0]!r}{' ...' if len(names) > 1 else ''} for "
                f"{'/'.join(path)} has shape {value.shape} after conversion, the model "
                f"(config.model) needs {leaf.shape}"
            )
        out[path] = jnp.asarray(value, leaf.dtype)
    _check_buffers(model_cfg, state, used)
    unused = sorted(k for k in state if k not in used and not IGNORED_KEYS.match(k))
    if unused:
        raise ValueError(
            f"checkpoint entries the model (config.model.name={arch!r}) does not have: "
            f"{unused[:5]}{' ...' if len(unused) > 5 else ''} ({len(unused)} in all)"
        )
    if upcycled_blocks:
        log.info("Upcycled %d dense MLPs into experts", len(upcycled_blocks))
        if model_cfg.router_combine == "raw_logits":
            log.warning(
                "upcycling with router_combine='raw_logits': the combine weights are the small "
                "router logits, so the upcycled MoE does not start as the dense model"
            )
    return traverse_util.unflatten_dict(out)


def _check_buffers(model_cfg, state: dict, used: set) -> None:
    """The checkpoint's geometry buffers must equal ours; their absence is fine (dense imports)."""
    for name, expected in geometry_buffers(model_cfg).items():
        if name.endswith("num_batches_tracked"):
            if name in state:
                used.add(name)
            continue
        if name not in state:
            continue
        if name in constant_entries(model_cfg):
            if state[name].shape != expected.shape or not np.array_equal(state[name], expected):
                raise ValueError(
                    f"checkpoint entry {name!r} is not the constant {float(expected.flat[0])} of "
                    f"shape {expected.shape} that arcface_torch freezes it at (requires_grad = "
                    "False) and config.model builds without a parameter"
                )
            used.add(name)
            continue
        if state[name].shape != expected.shape or not np.array_equal(state[name], expected):
            raise ValueError(
                f"checkpoint buffer {name!r} differs from the window geometry of config.model "
                f"(image_size, patch_size, window_size): shape {state[name].shape} vs "
                f"{expected.shape}"
            )
        used.add(name)


# ------------------------------------------------------------------------------------------------
# Files


def _to_numpy(value) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def load_state_dict_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Reads a PyTorch checkpoint: (backbone state_dict, extras), arrays as numpy.

    Accepts a plain state_dict (.pt/.pth, the official `model.pt` and our exports), the official
    training checkpoint dict (`checkpoint_gpu_0.pt`: "state_dict_backbone" plus
    "state_dict_softmax_fc", whose Partial FC centres come back as extras["classifier_centers"]),
    {"state_dict": ...} / {"model": ...} wrappers, and .safetensors files. Prefixes left by
    DistributedDataParallel or torch.compile ("module.", "_orig_mod.") are stripped.
    """
    if not os.path.isfile(path):
        raise ValueError(f"PyTorch checkpoint {path!r} does not exist")
    extras = {}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        raw = load_file(path)
    else:
        import torch

        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(raw)}")
        if "state_dict_backbone" in raw:
            softmax_fc = raw.get("state_dict_softmax_fc") or {}
            if "weight" in softmax_fc:
                extras["classifier_centers"] = _to_numpy(softmax_fc["weight"])
            raw = raw["state_dict_backbone"]
        elif "state_dict" in raw and isinstance(raw["state_dict"], dict):
            raw = raw["state_dict"]
        elif "model" in raw and isinstance(raw["model"], dict):
            raw = raw["model"]
    state = {}
    for key, value in raw.items():
        for prefix in CHECKPOINT_PREFIXES:
            key = key.removeprefix(prefix)
        if not hasattr(value, "shape"):
            raise ValueError(f"{path}: entry {key!r} is not a tensor ({type(value).__name__})")
        state[key] = _to_numpy(value)
    return state, extras


def save_torch(state: dict[str, np.ndarray], path: str) -> None:
    """A plain state_dict file for `model.load_state_dict(torch.load(path))`."""
    import torch

    def tensor(v):
        v = np.ascontiguousarray(v)
        return torch.from_numpy(v if v.flags.writeable else v.copy())

    torch.save({k: tensor(v) for k, v in state.items()}, path)


def save_safetensors(state: dict[str, np.ndarray], path: str, metadata=None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata=metadata)
    # safetensors writes through a private temporary file (mode 0600); give the file the mode
    # open() would (0666 less the umask, 0644 usually), as model.pt and config.json beside it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def merge_lora(state: dict[str, np.ndarray], alpha: float, scale: float = 1.0) -> dict:
    """A PyTorch state_dict with its LoRA adapters folded into the base weights, for a fixed `a`:
    W' = W + scale * ((1 - a) B1 A1 + a B2 A2) (one adapter: W + scale * B A). The result loads
    into the model without adapters (a plain dense Swin for PETALface), computing what the
    adapted model computes for images of quality `a` in eval mode."""
    merged = {k: v for k, v in state.items() if ".trainable_lora_" not in k}
    for key in state:
        if not key.endswith(".trainable_lora_down.weight"):
            continue
        prefix = key[: -len(".trainable_lora_down.weight")]
        weight = np.asarray(state[f"{prefix}.weight"], np.float64)
        delta = state[f"{prefix}.trainable_lora_up.weight"] @ state[key]
        if f"{prefix}.trainable_lora_down2.weight" in state:
            up2 = state[f"{prefix}.trainable_lora_up2.weight"]
            delta2 = up2 @ state[f"{prefix}.trainable_lora_down2.weight"]
            delta = (1.0 - alpha) * delta + alpha * delta2
        merged[f"{prefix}.weight"] = (weight + scale * delta).astype(
            state[f"{prefix}.weight"].dtype
        )
    return merged
