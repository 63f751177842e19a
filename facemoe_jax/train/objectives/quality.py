"""The quality head's regression (the recognizability recipe's item 4/5, our reading:
docs/recognizability.md): the head learns to predict, from a stop-gradient embedding, how
recognizable a face is.

Before the gradient, the first `quality_images` (0 = all) of the batch's images (the
geometry-only "image_hr" with quality_source="clean") are copied at each of `quality_pixels`
and at full size, and embedded in eval mode without gradient. The target of each copy is:
- "prototype": RI against the class centres and c_UI (the recognizability objective's centre);
- "own_full": the same with the copy's own full-size embedding as the positive;
- "agreement": half how close the copy is to its full-size embedding, half its cosine to the
  running mean of its class's full-size embeddings, kept here as per-class statistics (looked
  up before this batch enters them).
The loss is quality_weight * smooth-L1(head(copy), target).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from facemoe_jax.core.images import normalize_images
from facemoe_jax.losses import class_means
from facemoe_jax.losses import recognizability as ri
from facemoe_jax.models.recognizability import PATCH_KEY, QUALITY_NAME, make_quality_head
from facemoe_jax.train.objectives.base import Objective

QUALITY_SOURCES = ("clean", "batch")
QUALITY_TARGETS = ("own_full", "prototype", "agreement")
# The batch entry `prepare` adds: the copies' embeddings, labels and their targets' inputs.
COPIES = "quality_copies"


def trains_quality_head(config) -> bool:
    return (
        bool(config.recognizability.enabled)
        and bool(config.model.quality_head)
        and config.recognizability.quality_weight > 0
    )


def predict_quality(model, encoder_params, embeddings, dropout_rng, patch=None) -> jax.Array:
    """The model's quality head (training mode) on given embeddings (and patch statistics, for a
    head that reads them), without gradient into them."""
    head = make_quality_head(model.heads)
    if patch is not None:
        patch = jax.lax.stop_gradient(patch)
    return head.apply(
        {"params": encoder_params[QUALITY_NAME]},
        jax.lax.stop_gradient(embeddings),
        True,
        patch,
        rngs={"dropout": dropout_rng},
    )


class QualityObjective(Objective):
    name = "quality"

    @classmethod
    def check_config(cls, config):
        if not config.recognizability.enabled:
            return
        cfg = config.recognizability
        if cfg.quality_beta <= 0:
            raise ValueError(f"config.recognizability.quality_beta={cfg.quality_beta} must be > 0")
        if cfg.quality_weight < 0:
            raise ValueError(
                f"config.recognizability.quality_weight={cfg.quality_weight} must be >= 0"
            )
        pixels = str(cfg.quality_pixels)
        try:
            sizes = ri.parse_pixels(pixels)
        except ValueError:
            sizes = (0,)
        if not all(p >= 1 for p in sizes):
            raise ValueError(
                f"config.recognizability.quality_pixels={pixels!r} must be comma-separated "
                "sizes >= 1"
            )
        if cfg.quality_images < 0 or cfg.quality_images > config.train.batch_size:
            raise ValueError(
                f"config.recognizability.quality_images={cfg.quality_images} must be in 0.."
                f"{config.train.batch_size} (0 = the whole batch)"
            )
        if not 0.0 <= cfg.quality_ui_weight <= 1.0:
            raise ValueError(
                f"config.recognizability.quality_ui_weight={cfg.quality_ui_weight} must be in "
                "[0, 1]"
            )
        if cfg.quality_angle_power <= 0:
            raise ValueError(
                f"config.recognizability.quality_angle_power={cfg.quality_angle_power} must be > 0"
            )
        for field, known in (
            ("quality_source", QUALITY_SOURCES),
            ("quality_target", QUALITY_TARGETS),
        ):
            if cfg[field] not in known:
                raise ValueError(
                    f"config.recognizability.{field}={cfg[field]!r} is not one of {known}"
                )
        if not 0.0 <= cfg.quality_agreement_weight <= 1.0:
            raise ValueError(
                "config.recognizability.quality_agreement_weight="
                f"{cfg.quality_agreement_weight} must be in [0, 1]"
            )
        if cfg.agreement_window < 1:
            raise ValueError(
                f"config.recognizability.agreement_window={cfg.agreement_window} must be >= 1"
            )

    @classmethod
    def active(cls, config):
        return trains_quality_head(config)

    @classmethod
    def init_aux(cls, config, num_rows):
        if config.recognizability.quality_target != "agreement":
            return None
        return {"per_class": class_means.zeros(num_rows, config.model.embed_dim)}

    @property
    def batch_keys(self):
        return ("image_hr",) if self.config.recognizability.quality_source == "clean" else ()

    def prepare(self, ctx, state, batch, frozen):
        """Embeds the copies (and their full-size images) once, without gradient; for the
        "agreement" target looks each copy's class mean up, then adds this batch to the means."""
        cfg = ctx.config.recognizability
        key = "image_hr" if cfg.quality_source == "clean" else "image"
        source = normalize_images(batch[key])
        count = int(cfg.quality_images) or source.shape[0]
        pixels = tuple(p for p in ri.parse_pixels(cfg.quality_pixels) if p < source.shape[1])
        parts = [ri.quality_copies(source, pixels, count)]
        if cfg.quality_target != "prototype":
            parts.append(source[:count].astype(jnp.float32))  # each copy's full-size image
        variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
        (embedded, _), sown = ctx.model.apply(
            jax.lax.stop_gradient(variables),
            jnp.concatenate(parts),
            train=False,
            mutable=["intermediates"],
        )
        embedded = jax.lax.stop_gradient(embedded)
        copies = {"embeddings": embedded[:count], "labels": batch["label"][:count]}
        patch = sown["intermediates"].get(PATCH_KEY)
        if patch is not None:
            copies["patch"] = jax.lax.stop_gradient(patch[0][:count])
        if cfg.quality_target != "prototype":
            copies["reference"] = embedded[count : 2 * count]
        aux = state.aux.get(self.name)
        if cfg.quality_target == "agreement":
            per_class = aux["per_class"]
            copies["agreement"], copies["agreement_count"] = class_means.lookup(
                per_class, copies["embeddings"], copies["labels"], class_axes=ctx.class_axes
            )
            per_class = class_means.update(
                per_class,
                copies["reference"],
                copies["labels"],
                int(cfg.agreement_window),
                class_axes=ctx.class_axes,
            )
            aux = {"per_class": per_class}
        return aux, {**batch, COPIES: copies}

    def loss(self, ctx, params, state, batch, forward, frozen):
        cfg = ctx.config.recognizability
        copies = batch[COPIES]
        weights = None
        metrics = {}
        if "agreement" in copies:
            target = ri.agreement_index(
                copies["embeddings"],
                copies["reference"],
                copies["agreement"],
                agreement_weight=cfg.quality_agreement_weight,
                angle_power=cfg.quality_angle_power,
            )
            weights = (copies["agreement_count"] > 0).astype(jnp.float32)
            metrics["ri/agreement_mean"] = jnp.mean(copies["agreement"])
            metrics["ri/agreement_known_share"] = jnp.mean(weights)
        else:
            target = ri.copy_index(
                cfg,
                copies["embeddings"],
                params["classifier"]["centers"],
                copies["labels"],
                state.aux["recognizability"]["centre"],
                copies.get("reference"),
                ctx.config.data.num_classes,
                ctx.class_axes,
            )
        rng = jax.random.fold_in(forward.dropout_rng, 1)
        quality = predict_quality(
            ctx.model, params["encoder"], copies["embeddings"], rng, copies.get("patch")
        )
        quality_loss = ri.smooth_l1(quality, target, cfg.quality_beta, weights)
        error = jnp.abs(jax.lax.stop_gradient(quality) - target)
        metrics.update(
            {
                "ri/quality_loss": quality_loss,
                "ri/copies_ri_std": jnp.std(target),
                "ri/quality_abs_error": jnp.mean(error),
            }
        )
        return cfg.quality_weight * quality_loss, metrics, state.aux.get(self.name)
