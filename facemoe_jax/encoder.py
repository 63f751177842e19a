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


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from facemoe_jax.core.images import normalize_images
from facemoe_jax.interop.load import load_variables
from facemoe_jax.models import build_model
from facemoe_jax.models.recognizability import has_quality_head, head_quality

CONFIG_HINT = "pass config= (a run config) naming its architecture"


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
        self.per_batch = None  # set by adapt(mode="per_batch"): train/adapt_bn.py

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
        if not has_quality_head(self.model):
            raise ValueError(
                "FaceEncoder.quality needs a model trained with a quality head "
                "(config.model.quality_head=True, configs/recognizability.py)"
            )
        from facemoe_jax.data.pipeline import eval_batches  # grain: only when needed

        images = self._check_images(images, "quality")
        if flip_test not in self._quality:
            model = self.model

            @jax.jit
            def quality_fn(variables, images):
                return head_quality(model, variables, normalize_images(images), flip_test)

            self._quality[flip_test] = quality_fn
        if not len(images):
            return np.zeros((0,), np.float32)
        out = [
            np.asarray(self._quality[flip_test](self.variables, batch))[:valid]
            for batch, valid in eval_batches(images, batch_size)
        ]
        return np.concatenate(out).astype(np.float32)

    # ---- constructors

    @classmethod
    def from_checkpoint(cls, path: str, config: ml_collections.ConfigDict | None = None):
        """A workdir (its checkpoints/ dir, or W/checkpoints/STEP), an export dir, a
        .pt/.pth/.safetensors file or any ONNX face model (.onnx): interop/load.py.

        PyTorch files need the architecture: `config` (a run config), or the export's
        config.json beside the file. An ONNX file needs nothing: its graph is the architecture
        (`config.model.onnx_*` fields may say how it normalises its input); with a config of
        another architecture, its initializers are read as that model's state_dict.
        """
        loaded = load_variables(
            path, config, field="FaceEncoder.from_checkpoint", config_hint=CONFIG_HINT
        )
        return cls(loaded.config, loaded.variables, loaded.step)

    # ---- test-time BatchNorm adaptation (train/adapt_bn.py)

    def adapt(
        self, images=None, mode: str = "cumulative", batch_size: int = 64, num_batches: int = 0
    ) -> "FaceEncoder":
        """A new, adapted encoder (this one is left as it is). "cumulative": every BatchNorm's
        mean and variance re-estimated on `images` (uint8 RGB, unlabelled target faces; all of
        them, or the first `num_batches` batches of `batch_size`); "per_batch": its `embed`
        normalises each batch with that batch's own statistics (`images` not needed). Every
        parameter stays the same array; only BatchNorm statistics change."""
        from facemoe_jax.train.adapt_bn import BatchNormAdaptation

        adaptation = BatchNormAdaptation(self.model, mode, num_batches)
        adapted = FaceEncoder(self.config, self.variables, self.step)
        if mode == "per_batch":
            adapted.per_batch = adaptation
        else:
            images = np.asarray(images)
            s = self.image_size
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
                raise ValueError(
                    f"FaceEncoder.adapt takes uint8 RGB images of shape (N, {s}, "
                    f"{s}, 3); got {images.dtype} {images.shape}"
                )
            adapted.variables = adaptation.adapted_variables(
                self.variables, images, batch_size, num_batches
            )
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
            emb = self.per_batch.embed_per_batch(
                self.variables, images, batch_size, flip_test=flip_test
            )
            if normalize:
                emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            return emb.astype(np.float32)
        out, in_flight = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            n = len(batch)
            if n < batch_size and len(images) > batch_size:  # pad the tail: no recompilation
                batch = np.concatenate([batch, np.zeros((batch_size - n, s, s, 3), np.uint8)])
            # Dispatch is asynchronous: the next batch is sent before this one is read back, so
            # the host's work overlaps the device's.
            in_flight.append((self._embed(self.variables, batch, flip_test), n))
            if len(in_flight) > 1:
                emb, n_first = in_flight.pop(0)
                out.append(np.asarray(emb)[:n_first])
        out += [np.asarray(emb)[:n] for emb, n in in_flight]
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
