"""The CLI's export: a workdir's checkpoint -> PyTorch (and ONNX) files.

`--mode=export` writes W/export/model.pt (a plain state_dict for `load_state_dict(strict=True)`),
W/export/model.safetensors (the same tensors), W/export/model.onnx and W/export/config.json
(architecture, input size, normalisation, channel order, and our config.model to rebuild the
encoder). The other direction, `--config.init_from=FILE` (what `--mode=import` requires), reads
through `interop/load.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

import facemoe_jax
from facemoe_jax.interop import convert
from facemoe_jax.interop import load as load_lib
from facemoe_jax.models import registry
from facemoe_jax.models.lora import settings_from_config
from facemoe_jax.core import paths


def export_config(model_cfg, step: int | None) -> dict:
    """What a PyTorch user needs besides the weights."""
    size = int(model_cfg.image_size)
    spec = registry.spec(model_cfg.name)
    info = {
        "facemoe_jax_version": facemoe_jax.__version__,  # which release wrote the files
        "architecture": model_cfg.name,
        "torch_module": spec.torch_class,
        "input": {
            "size": [size, size],
            "channel_order": "RGB",
            "layout": "NCHW float32",
            "normalization": "(x / 255 - 0.5) / 0.5",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
        "embedding_dim": int(model_cfg.embed_dim),
        "flip_test": "add the raw embeddings of the image and its mirror, then L2-normalise",
        "step": step,
        "model": json.loads(model_cfg.to_json()),
    }
    if spec.official_constructor:
        info["official_constructor"] = spec.official_constructor.format_map(model_cfg)
    return info


def export_workdir(
    workdir: str, out_dir: str | None = None, onnx: bool = True, merge_lora_alpha=None
) -> dict:
    """Exports the latest checkpoint of `workdir` (model.pt, model.safetensors, model.onnx when
    `onnx` and the onnx package is installed, config.json) to `out_dir` (default W/export);
    returns the paths and the seconds.

    torch, safetensors and onnx write local files, so for a URL target (`gs://...`) the files
    are written into a local temporary folder and then copied to the URL through epath; no
    local folder is ever named after the URL."""
    target = out_dir or str(paths.workdir_path(workdir) / "export")
    if not paths.is_remote(target):
        return _export(workdir, target, onnx, merge_lora_alpha)
    with tempfile.TemporaryDirectory(prefix="facemoe_export_") as local:
        result = _export(workdir, local, onnx, merge_lora_alpha)
        paths.copy_tree(local, paths.workdir_path(target))
    for key in ("pt", "safetensors", "config", "onnx"):
        if key in result:
            result[key] = str(paths.workdir_path(target) / os.path.basename(result[key]))
    print(f"copied the export to {target}", flush=True)
    return result


def _export(workdir: str, out_dir: str, onnx: bool, merge_lora_alpha) -> dict:
    from facemoe_jax.core.progress import Progress

    t0 = time.perf_counter()
    paths = {
        "pt": os.path.join(out_dir, "model.pt"),
        "safetensors": os.path.join(out_dir, "model.safetensors"),
        "config": os.path.join(out_dir, "config.json"),
    }
    if onnx:
        try:
            import onnx as _  # noqa: F401
        except ImportError:
            print(
                "note: model.onnx skipped: the onnx package is not installed "
                "(pip install -e '.[export]')",
                flush=True,
            )
            onnx = False
    steps = [
        "restoring the checkpoint",
        "converting",
        "writing model.pt",
        "writing model.safetensors",
    ] + (["writing model.onnx", "checking model.onnx"] if onnx else [])
    progress = Progress("export", len(steps), unit="steps")

    def stage(i):  # shows the stage starting (on a terminal), then counts the one before
        progress.update(1 if i else 0, note=steps[i])

    stage(0)
    config, variables, step = load_lib.restore_workdir(workdir)
    if registry.spec(config.model.name).export == "graph":
        progress.close()
        return _export_onnx_model(config, variables, step, out_dir, paths, t0)
    stage(1)
    state = convert.jax_to_torch(config.model, variables, num_batches_tracked=step)
    lora = settings_from_config(config.model)
    if merge_lora_alpha is not None and lora is not None:
        # PETALface for a fixed quality a: a plain dense model without adapters.
        state = convert.merge_lora(state, float(merge_lora_alpha), lora.scale)
        config.model.lora.rank = 0
        print(f"adapters merged into the base weights for a = {merge_lora_alpha}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    stage(2)
    convert.save_torch(state, paths["pt"])
    stage(3)
    convert.save_safetensors(state, paths["safetensors"], metadata={"format": "pt"})
    info = export_config(config.model, step)
    if merge_lora_alpha is not None and lora is not None:
        info["merged_lora_alpha"] = float(merge_lora_alpha)

    def write_config():  # before the ONNX step too, so a failing ONNX export leaves usable files
        with open(paths["config"], "w") as f:
            json.dump(info, f, indent=2)

    write_config()
    if onnx and settings_from_config(config.model) is not None:
        # The PyTorch twins take PETALface's per-image `a` as a second input, which the ONNX
        # path does not trace yet.
        print(
            "note: model.onnx skipped: models with LoRA adapters are exported as model.pt and "
            "model.safetensors only",
            flush=True,
        )
        onnx = False
    onnx_path = os.path.join(out_dir, "model.onnx")
    for stale in (onnx_path, onnx_path + ".data"):  # an earlier export's, for other weights
        if os.path.exists(stale):
            os.remove(stale)
    onnx_diff = None
    if onnx:
        from facemoe_jax.interop import onnx as onnx_export

        stage(4)
        paths["onnx"] = onnx_path
        module = onnx_export.torch_twin(config.model, state)
        info["onnx"] = onnx_export.export_onnx(config.model, state, paths["onnx"], module)
        stage(5)
        onnx_diff = onnx_export.check_onnx(config.model, module, paths["onnx"])
        if onnx_diff is not None:
            info["onnx"]["max_abs_diff_vs_pytorch"] = onnx_diff
        write_config()
    progress.update(1, note="")
    progress.close()
    seconds = time.perf_counter() - t0
    params = sum(int(np.prod(v.shape)) for v in state.values())
    print(
        f"exported step {step} ({len(state)} tensors, {params / 1e6:.1f}M values) to {out_dir} "
        f"in {seconds:.1f} s",
        flush=True,
    )
    if onnx:
        checked = (
            f"onnxruntime vs PyTorch max abs diff {onnx_diff:.1e}"
            if onnx_diff is not None
            else "not checked: onnxruntime is not installed"
        )
        print(f"model.onnx: dynamic batch, NCHW float32 normalised input ({checked})", flush=True)
    return {**paths, "seconds": seconds, "step": step, "onnx_max_abs_diff": onnx_diff}


def _export_onnx_model(config, variables, step, out_dir: str, paths: dict, t0: float) -> dict:
    """A run of an imported ONNX model (ModelSpec.export "graph"): its graph with the trained
    weights (model.onnx), the same tensors under their ONNX names (model.safetensors, model.pt)
    and config.json; the new file is checked in onnxruntime against the JAX model."""
    from facemoe_jax.encoder import FaceEncoder
    from facemoe_jax.interop import onnx as onnx_export
    from facemoe_jax.models import lora as lora_lib
    from facemoe_jax.models import onnx_graph
    from facemoe_jax.models.recognizability import QUALITY_NAME

    source = str(config.model.onnx_path)
    if not os.path.isfile(source):
        raise ValueError(
            f"config.model.onnx_path={source!r} (the graph this run imported) does not exist: "
            "the export writes the trained weights into that graph"
        )
    graph = onnx_graph.load_graph(source)
    state = onnx_graph.onnx_state_dict(
        graph, variables, lora_lib.settings_from_config(config.model)
    )
    if QUALITY_NAME in variables["params"]:
        # The graph computes the embedding only; the head stays in the run's checkpoint.
        print(
            f"note: the quality head ({QUALITY_NAME}) is not written to model.onnx, "
            "model.safetensors or model.pt: the graph has no output for it; its weights stay "
            "in the run's checkpoint",
            flush=True,
        )
    os.makedirs(out_dir, exist_ok=True)
    convert.save_torch(state, paths["pt"])
    convert.save_safetensors(state, paths["safetensors"], metadata={"format": "onnx-names"})
    paths["onnx"] = os.path.join(out_dir, "model.onnx")
    info = export_config(config.model, step)
    encoder = FaceEncoder(config, variables)
    model = encoder.model
    info["torch_module"] = None  # the graph is the architecture: use model.onnx
    info["input"].update(
        channel_order=model.channel_order,
        normalization=f"(pixel - {model.input_mean}) / {model.input_std}",
        mean=[model.input_mean] * 3,
        std=[model.input_std] * 3,
        layout="NCHW float32, the graph's input",
    )
    info["onnx"] = onnx_export.export_onnx_weights(source, state, paths["onnx"])
    # The written file, run by onnxruntime, against the JAX model on the same images.
    size = model.graph.image_size
    images = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), np.uint8)
    expected = encoder.embed(images, flip_test=False, normalize=False)
    got = onnx_export.run_graph(paths["onnx"], images, model)
    diff = float(np.abs(got - expected).max())
    info["onnx"]["max_abs_diff_vs_jax"] = diff
    with open(paths["config"], "w") as f:
        json.dump(info, f, indent=2)
    seconds = time.perf_counter() - t0
    print(
        f"exported step {step} ({len(state)} ONNX initializers) to {out_dir} in {seconds:.1f} s; "
        f"model.onnx: the imported graph with these weights (onnxruntime vs JAX max abs diff "
        f"{diff:.1e})",
        flush=True,
    )
    return {**paths, "seconds": seconds, "step": step, "onnx_max_abs_diff": diff}
