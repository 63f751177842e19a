"""ONNX export of an encoder through its PyTorch twin (`interop/torch_models.py`).

`export_onnx(model_cfg, state, path)` loads the exported state_dict into the twin with
strict=True, traces it with PyTorch's TorchScript-based ONNX exporter and writes one `.onnx` file:

  input  "images":    (batch, 3, S, S) float32, NCHW, RGB, normalised as (x / 255 - 0.5) / 0.5
  output "embedding": (batch, D) float32, raw (no flip test, not L2-normalised)

The batch axis is dynamic. The MoE routing (top-k over the router logits, the per-expert
gathers of the routed tokens and the weighted scatter-add back) is part of the graph, so the file
runs the same sparse computation as the model, for any batch, in onnxruntime or any runtime with
NonZero / TopK / ScatterND. The normalisation and the package version are written into the
file's metadata (`metadata_props`) as well as into the export's config.json.

Why the TorchScript exporter (`dynamo=False`): the routed-token count of an expert is
data-dependent, which the torch.export-based exporter only takes with extra shape hints, while
the traced graph keeps NonZero's dynamic output as it is. The twin's MoE forward has no branch on
that count (an expert with no tokens gets an empty gather), so the trace holds every expert.

After writing, `check_onnx` runs the file in onnxruntime (when installed) on a few images and
compares with the PyTorch twin; the export prints the max abs difference.
"""

from __future__ import annotations

import json
import warnings

import numpy as np

import facemoe_jax

OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime >= 1.11 runs it
INPUT_NAME, OUTPUT_NAME = "images", "embedding"
NORMALIZATION = "(x / 255 - 0.5) / 0.5"
WEIGHTS_KEY = "facemoe_jax_weights"  # metadata of a graph written back with trained weights


def torch_twin(model_cfg, state: dict[str, np.ndarray]):
    """The PyTorch twin of config.model holding `state` (strict), in eval mode."""
    import torch

    from facemoe_jax.interop import torch_models

    module = torch_models.torch_model_from_config(model_cfg)
    module.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True
    )
    return module.eval()


def sample_images(model_cfg, n: int = 2, seed: int = 0) -> np.ndarray:
    """(n, 3, S, S) float32 in [-1, 1]: what the model takes after normalisation."""
    size = int(model_cfg.image_size)
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


def metadata(model_cfg) -> dict[str, str]:
    """The key/value pairs written into the ONNX file (`metadata_props`)."""
    size = int(model_cfg.image_size)
    return {
        "producer": "facemoe_jax",
        "facemoe_jax_version": facemoe_jax.__version__,
        "architecture": str(model_cfg.name),
        "input": f"{INPUT_NAME}: (batch, 3, {size}, {size}) float32 NCHW RGB",
        "normalization": NORMALIZATION,
        "mean": "[0.5, 0.5, 0.5]",
        "std": "[0.5, 0.5, 0.5]",
        "output": f"{OUTPUT_NAME}: (batch, {int(model_cfg.embed_dim)}) float32, raw "
        "(flip test: add the embeddings of the image and its mirror, then L2-normalise)",
        "model": model_cfg.to_json(),
    }


def export_onnx(model_cfg, state: dict[str, np.ndarray], path: str, module=None) -> dict:
    """Writes `path` (.onnx); returns what config.json records about it."""
    import onnx
    import torch

    module = torch_twin(model_cfg, state) if module is None else module
    example = torch.from_numpy(sample_images(model_cfg))
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns that it is the legacy one and that the trace sees Python ints for
        # the static sizes (heads, windows); the batch axis is made dynamic below.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            path,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(path)
    for key, value in metadata(model_cfg).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    large = save_model(model, path)
    size = int(model_cfg.image_size)
    return {
        "file": path.split("/")[-1],
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", int(model_cfg.embed_dim)]},
        "normalization": NORMALIZATION,
        "external_data": large,
    }


def save_model(model, path: str) -> bool:
    """Writes `model`; True when its weights went to `path + ".data"` beside it. Large models
    (the 464M-parameter Swin-MoE, 1.9 GB) stay one file while under protobuf's 2 GB."""
    import onnx

    large = model.ByteSize() > 2**31 - 2**24
    if large:
        onnx.save(model, path, save_as_external_data=True, location=f"{path.split('/')[-1]}.data")
    else:
        onnx.save(model, path)
    return large


def export_onnx_weights(source: str, state: dict[str, np.ndarray], path: str) -> dict:
    """An imported ONNX model (config.model.name="onnx") written back: the graph of `source`
    as it is, its initializers replaced by `state` (ONNX name -> value, from
    models/onnx_graph.onnx_state_dict; every name must be one of the graph's). Returns what
    config.json records about it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(source)
    initializers = {t.name: t for t in model.graph.initializer}
    # Initializers the import untied from the exporter's Identity nodes get their tensor back.
    untied = [
        n
        for n in model.graph.node
        if n.op_type == "Identity" and n.output[0] in state and n.input[0] in initializers
    ]
    for node in untied:
        model.graph.node.remove(node)
        initializers[node.output[0]] = model.graph.initializer.add()
    unknown = sorted(set(state) - set(initializers))
    if unknown:
        raise ValueError(f"{source} has no initializers {unknown[:5]} to write")
    for name, value in state.items():
        initializers[name].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
    # One entry, also when the source is an earlier export (the checker refuses repeated keys).
    kept = [p for p in model.metadata_props if p.key != WEIGHTS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = WEIGHTS_KEY, f"fine-tuned by facemoe_jax {facemoe_jax.__version__}"
    large = save_model(model, path)
    graph_input = next(i for i in model.graph.input if i.name not in initializers)
    return {
        "file": path.split("/")[-1],
        "source": source,
        "input": {"name": graph_input.name},
        "output": {"name": model.graph.output[0].name},
        "external_data": large,
    }


def run_onnx(path: str, images: np.ndarray) -> np.ndarray:
    """Embeds normalised NCHW float32 images with onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, np.float32)})[0]


def run_graph(path: str, images: np.ndarray, model) -> np.ndarray:
    """uint8 RGB NHWC images through any ONNX file in onnxruntime, normalised as `model` (an
    OnnxModel) says the graph wants them, one image at a time (graphs with a fixed batch)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    pixels = images.astype(np.float32)
    if model.channel_order == "BGR":
        pixels = pixels[..., ::-1]
    x = ((pixels - model.input_mean) / model.input_std).transpose(0, 3, 1, 2)
    out = [session.run(None, {name: np.ascontiguousarray(x[i : i + 1])})[0] for i in range(len(x))]
    return np.concatenate(out).reshape(len(x), -1)


def check_onnx(model_cfg, module, path: str, batch: int = 3) -> float | None:
    """Max abs difference between onnxruntime and the PyTorch twin on `batch` random images
    (a batch size other than the traced one); None when onnxruntime is not installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    import torch

    images = sample_images(model_cfg, n=batch, seed=1)
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
    return float(np.abs(run_onnx(path, images) - expected).max())


def read_metadata(path: str) -> dict[str, str]:
    """The metadata_props of an ONNX file written here (`model` decoded from JSON)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    if "model" in props:
        props["model"] = json.loads(props["model"])
    return props
