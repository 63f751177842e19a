"""Cross-resolution consistency: the embedding of a degraded face is pulled toward the same
model's embedding of that face at full resolution (`config.cross_resolution.weight` > 0).

A teacher-free variant of the instance term of distillation: the "teacher" is the model being
trained, seen on the geometry-only image of the same record (`batch["image_hr"]`, the paired
pipeline) in eval mode, without gradient. The loss is weight * mean(1 - cos(f(LR), sg(f(HR)))),
so only the low-resolution branch learns, toward where the model already puts the sharp face.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from facemoe_jax.core.images import normalize_images
from facemoe_jax.data.augment import Augmenter
from facemoe_jax.losses import distill as distill_losses
from facemoe_jax.train.objectives.base import Objective

# The batch entry `prepare` adds: the model's own stop-gradient embeddings of the HR images.
HR_EMBEDDINGS = "cross_resolution_hr_embeddings"


class CrossResolutionObjective(Objective):
    name = "cross_resolution"

    @classmethod
    def check_config(cls, config):
        weight = config.cross_resolution.weight
        if not weight >= 0:
            raise ValueError(f"config.cross_resolution.weight={weight} must be >= 0")
        if weight > 0 and not Augmenter(config.data).degrade_steps:
            raise ValueError(
                f"config.cross_resolution.weight={weight} compares a degraded face with its "
                "full-resolution copy, but no degradation is switched on in config.data: set "
                "one, e.g. --config.data.acquisition_prob=1"
            )

    @classmethod
    def active(cls, config):
        return config.cross_resolution.weight > 0

    @property
    def batch_keys(self):
        return ("image_hr",)

    def prepare(self, ctx, state, batch, frozen):
        variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
        images = normalize_images(batch["image_hr"])
        embedded, _ = ctx.model.apply(jax.lax.stop_gradient(variables), images, train=False)
        target = jax.lax.stop_gradient(embedded.astype(jnp.float32))
        return None, {**batch, HR_EMBEDDINGS: target}

    def loss(self, ctx, params, state, batch, forward, frozen):
        gap = distill_losses.instance_loss(forward.embeddings, batch[HR_EMBEDDINGS], "cosine")
        return ctx.config.cross_resolution.weight * gap, {"train/cross_resolution": gap}, None
