"""`FaceEncoder`: embed face images with a trained model, from any of our checkpoint forms.

  from facemoe_jax import FaceEncoder
  enc = FaceEncoder.from_checkpoint("runs/demo")        # a workdir (latest Orbax checkpoint)
  enc = FaceEncoder.from_checkpoint("runs/demo/export") # an export dir (model.safetensors/.pt)
  enc = FaceEncoder.from_checkpoint("model.pt", config=cfg)  # a PyTorch file, e.g. FaceMoE's
  emb = enc.embed(images)  # uint8 RGB (N, S, S, 3) at the model's input size -> float32 (N, 512)
  target = enc.adapt(target_images)       # a new encoder, BatchNorm statistics of the target set
  online = enc.adapt(mode="per_batch")    # a new encoder normalising each batch by its own
  q = enc.quality(images)  # models with a quality head (recognizability): (N,) in (0, 1)

`embed` follows the official evaluation scripts: pixels scaled by (x/255 - 0.5)/0.5, eval-mode
BatchNorm; `flip_test=True` adds the raw embeddings of the image and of its mirror image before
normalising (FaceMoE's TinyFace default `pre_norm_vector_add`); `normalize=True` returns unit rows.
Images go through in fixed-size batches (padded), so one compilation serves any N.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from facemoe_jax.core.images import normalize_images
from facemoe_jax.models import build_model

EXPORT_CONFIG = "config.json"


class FaceEncoder:
    def __init__(self, config: ml_collections.ConfigDict, variables: dict, step: int | None = None):
        """config: the run config (only config.model is used); variables: params + batch_stats."""
        self.config = config
        self.model = build_model(config.model)
        self.variables = {
            "params": variables["params"],
            "batch_stats": variables.get("batch_stats", {}),
        }
        self.step = step
        self.image_size = int(config.model.image_size)
        self.embed_dim = int(config.model.embed_dim)
        self.per_batch = None  # set by adapt(mode="per_batch"): evaluate/adapt_bn.py

        def embed_fn(variables, images, flip_test):
            x = normalize_images(images)
            emb, _ = self.model.apply(variables, x, train=False)
            if flip_test:
                emb = emb + self.model.apply(variables, x[:, :, ::-1], train=False)[0]
            return emb.astype(jnp.float32)

        self._embed = jax.jit(embed_fn, static_argnums=2)
        self._quality = {}  # flip_test -> the compiled quality head (FaceEncoder.quality)

    def quality(self, images: np.ndarray, flip_test: bool = True, batch_size: int = 64):
        """uint8 RGB (N, S, S, 3) -> (N,) float32 predicted recognizability in (0, 1), higher =
        more recognisable (the quality head, config.model.quality_head; no label needed)."""
        from facemoe_jax.evaluate import embed, recognizability

        if not recognizability.has_quality_head(self.model):
            raise ValueError(
                "FaceEncoder.quality needs a model trained with a quality head "
                "(config.model.quality_head=True, configs/recognizability.py)"
            )
        images = self._check_images(images, "quality")
        if flip_test not in self._quality:
            self._quality[flip_test] = recognizability.make_quality_fn(self.model, flip_test)
        if not len(images):
            return np.zeros((0,), np.float32)
        return embed.embed_images(self._quality[flip_test], self.variables, images,
                                  batch_size).astype(np.float32)  # fmt: skip

    # ---- constructors

    @classmethod
    def from_checkpoint(cls, path: str, config: ml_collections.ConfigDict | None = None):
        """A workdir (or its checkpoints/ dir), an export dir, a .pt/.pth/.safetensors file or
        any ONNX face model (.onnx).

        PyTorch files need the architecture: `config` (a run config), or the export's
        config.json beside the file. An ONNX file needs nothing: its graph is the architecture
        (`config.model.onnx_*` fields may say how it normalises its input); with a config of
        another architecture, its initializers are read as that model's state_dict.
        """
        path = os.path.abspath(path)
        if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.basename(path) == (
            "checkpoints"
        ):
            workdir = path if os.path.basename(path) != "checkpoints" else os.path.dirname(path)
            return cls(*restore_workdir(workdir))
        if os.path.isdir(path):
            exported = os.path.join(path, EXPORT_CONFIG)
            if config is None and os.path.isfile(exported):
                config = read_export_config(exported)
            names = ("model.onnx",) if config and config.model.name == "onnx" else ()
            for name in names + ("model.safetensors", "model.pt"):
                if os.path.isfile(os.path.join(path, name)):
                    return cls.from_checkpoint(os.path.join(path, name), config)
            raise ValueError(f"{path} holds neither checkpoints/ nor model.safetensors/model.pt")
        if path.endswith(".onnx"):
            return cls(*load_onnx(path, config))
        if config is None:
            config = read_export_config(os.path.join(os.path.dirname(path), EXPORT_CONFIG))
        from facemoe_jax.export import convert

        state, _ = convert.load_state_dict_file(path)
        return cls(config, convert.torch_to_jax(config.model, state))

    # ---- test-time BatchNorm adaptation (evaluate/adapt_bn.py)

    def adapt(self, images=None, mode: str = "cumulative", batch_size: int = 64,
              num_batches: int = 0) -> "FaceEncoder":  # fmt: skip
        """A new, adapted encoder (this one is left as it is). "cumulative": every BatchNorm's
        mean and variance re-estimated on `images` (uint8 RGB, unlabelled target faces; all of
        them, or the first `num_batches` batches of `batch_size`); "per_batch": its `embed`
        normalises each batch with that batch's own statistics (`images` not needed). Every
        parameter stays the same array; only BatchNorm statistics change."""
        from facemoe_jax.evaluate.adapt_bn import BatchNormAdaptation

        adaptation = BatchNormAdaptation(self.model, mode, num_batches)
        adapted = FaceEncoder(self.config, self.variables, self.step)
        if mode == "per_batch":
            adapted.per_batch = adaptation
        else:
            images = np.asarray(images)
            s = self.image_size
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
                raise ValueError(f"FaceEncoder.adapt takes uint8 RGB images of shape (N, {s}, "
                                 f"{s}, 3); got {images.dtype} {images.shape}")  # fmt: skip
            adapted.variables = adaptation.adapted_variables(self.variables, images, batch_size,
                                                             num_batches)  # fmt: skip
        return adapted

    # ---- inference

    def embed(
        self,
        images: np.ndarray,
        flip_test: bool = True,
        normalize: bool = True,
        batch_size: int = 64,
    ) -> np.ndarray:
        """uint8 RGB (N, S, S, 3) with S = the model's input size -> float32 (N, embed_dim)."""
        images = self._check_images(images, "embed")
        s = self.image_size
        if self.per_batch is not None and len(images):  # adapt(mode="per_batch")
            emb = self.per_batch.embed_per_batch(self.variables, images, batch_size,
                                                 flip_test=flip_test)  # fmt: skip
            if normalize:
                emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            return emb.astype(np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            n = len(batch)
            if n < batch_size and len(images) > batch_size:  # pad the tail: no recompilation
                batch = np.concatenate([batch, np.zeros((batch_size - n, s, s, 3), np.uint8)])
            out.append(np.asarray(self._embed(self.variables, batch, flip_test))[:n])
        emb = np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)
        if normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb.astype(np.float32)

    def _check_images(self, images, method: str) -> np.ndarray:
        images = np.asarray(images)
        s = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(
                f"FaceEncoder.{method} takes uint8 RGB images of shape (N, {s}, {s}, 3) (the "
                f"model's input size); got {images.dtype} {images.shape}"
            )
        return images


def read_export_config(path: str) -> ml_collections.ConfigDict:
    """The run config stored by `--mode=export` (its "model" entry builds the encoder)."""
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} not found: pass config= (a run config) to FaceEncoder.from_checkpoint for a "
            "PyTorch file without an export config.json"
        )
    with open(path) as f:
        exported = json.load(f)
    return ml_collections.ConfigDict({"model": exported["model"]})


def load_onnx(path: str, config: ml_collections.ConfigDict | None = None):
    """(config, variables) of an ONNX file: the graph as a model of its own (config None or
    config.model.name "onnx": its onnx_* fields are kept, onnx_path becomes `path`), or the
    initializers as the state_dict of config.model's architecture."""
    from facemoe_jax.models import onnx_graph, onnx_model_config

    graph = onnx_graph.load_graph(path)
    if config is not None and config.model.name != "onnx":
        from facemoe_jax.export import convert

        state = {**graph.params, **graph.statistics, **graph.constants}
        return config, convert.torch_to_jax(config.model, state)
    fields = {}
    if config is not None:
        keep = ("onnx_input_mean", "onnx_input_std", "onnx_channel_order")
        fields = {k: config.model[k] for k in keep if k in config.model}
    model_cfg = onnx_model_config(path, **fields)
    return ml_collections.ConfigDict({"model": model_cfg}), onnx_graph.onnx_variables(graph)


def restore_workdir(workdir: str, step: int | None = None):
    """(config, {"params", "batch_stats"}, step) of a workdir's Orbax checkpoint (latest by
    default), restored onto one device with the config saved in the checkpoint."""
    from facemoe_jax.train.checkpoint import restore_params

    config, params, batch_stats, step = restore_params(workdir, step)
    return config, {"params": params["encoder"], "batch_stats": batch_stats}, step
