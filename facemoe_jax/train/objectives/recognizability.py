"""The recognizability index (RI, Chai et al., CVPR 2023, our reading: docs/recognizability.md):
the unrecognizable-identity centre c_UI in the state, and the index diversion loss.

Before the gradient, the first `ui_images` (0 = all) of the batch are degraded beyond
recognition (`ui_pixels` plus noise drawn from fold_in(rng, step), so a resumed run draws the
same), embedded in eval mode without gradient, and c_UI advances by its EMA; this step's loss
uses the new centre. The loss is diversion_weight * the diversion hinge (losses/recognizability
.py) on the images whose RI is low.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from facemoe_jax.core.images import normalize_images
from facemoe_jax.losses import recognizability as ri
from facemoe_jax.train.objectives.base import Objective

UI_RNG_SALT = 0x5249  # "RI": this objective's stream within the step's fold_in(rng, step)


class RecognizabilityObjective(Objective):
    name = "recognizability"

    @classmethod
    def check_config(cls, config):
        if not config.recognizability.enabled:
            if config.model.quality_head:
                raise ValueError(
                    "config.model.quality_head=True needs config.recognizability.enabled=True "
                    "(the head regresses the recognizability index; nothing else trains it)"
                )
            return
        cfg = config.recognizability
        if cfg.ui_pixels < 1 or cfg.ui_pixels > config.model.image_size:
            raise ValueError(
                f"config.recognizability.ui_pixels={cfg.ui_pixels} must be in 1.."
                f"{config.model.image_size} (the input size)"
            )
        if cfg.ui_images < 0 or cfg.ui_images > config.train.batch_size:
            raise ValueError(
                f"config.recognizability.ui_images={cfg.ui_images} must be in 0.."
                f"{config.train.batch_size} (0 = the whole batch)"
            )
        if not 0.0 <= cfg.centre_momentum < 1.0:
            raise ValueError(
                f"config.recognizability.centre_momentum={cfg.centre_momentum} must be in [0, 1)"
            )
        if not 0.0 <= cfg.ui_weight <= 1.0:
            raise ValueError(f"config.recognizability.ui_weight={cfg.ui_weight} must be in [0, 1]")
        for field in ("ui_angle_scale", "margin_angle_scale"):
            if cfg[field] <= 0:
                raise ValueError(f"config.recognizability.{field}={cfg[field]} must be > 0")
        for field in ("ui_noise_std", "diversion_weight"):
            if cfg[field] < 0:
                raise ValueError(f"config.recognizability.{field}={cfg[field]} must be >= 0")
        if cfg.diversion_weighting not in ri.WEIGHTINGS:
            raise ValueError(
                f"config.recognizability.diversion_weighting={cfg.diversion_weighting!r} is not "
                f"one of {ri.WEIGHTINGS}"
            )

    @classmethod
    def active(cls, config):
        return bool(config.recognizability.enabled)

    @classmethod
    def init_aux(cls, config, num_rows):
        # Zeros: the first update sets the direction.
        return {"centre": jnp.zeros((config.model.embed_dim,), jnp.float32)}

    def prepare(self, ctx, state, batch, frozen):
        cfg = ctx.config.recognizability
        images = normalize_images(batch["image"])
        ui = images[: cfg.ui_images] if cfg.ui_images else images
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), UI_RNG_SALT)
        degraded = ri.degrade_beyond_recognition(ui, rng, int(cfg.ui_pixels), cfg.ui_noise_std)
        variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
        embedded, _ = ctx.model.apply(jax.lax.stop_gradient(variables), degraded, train=False)
        embedded = jax.lax.stop_gradient(embedded)
        centre = ri.update_centre(state.aux[self.name]["centre"], embedded, cfg.centre_momentum)
        return {"centre": centre}, batch

    def loss(self, ctx, params, state, batch, forward, frozen):
        cfg = ctx.config.recognizability
        cos_ui, index = ri.index_against_centre(
            forward.embeddings,
            params["classifier"]["centers"],
            batch["label"],
            state.aux[self.name]["centre"],
            num_classes=ctx.config.data.num_classes,
            class_axes=ctx.class_axes,
            ui_weight=cfg.ui_weight,
            ui_angle_scale=cfg.ui_angle_scale,
            margin_angle_scale=cfg.margin_angle_scale,
        )
        diversion = ri.diversion_loss(
            cos_ui,
            index,
            threshold=cfg.diversion_threshold,
            margin=cfg.diversion_margin,
            weighting=cfg.diversion_weighting,
        )
        metrics = {
            "ri/mean": jnp.mean(index),
            "ri/std": jnp.std(index),
            "ri/low_share": jnp.mean((index < cfg.diversion_threshold).astype(jnp.float32)),
            "ri/cos_to_ui_centre": jnp.mean(jax.lax.stop_gradient(cos_ui)),
            "ri/diversion_loss": diversion,
        }
        return cfg.diversion_weight * diversion, metrics, state.aux[self.name]
