"""The margin softmax over the class centres (ArcFace / CosFace / combined, or AdaFace), with
Partial FC class sampling; always active. Its aux entry holds AdaFace's running feature-norm
statistics (carried, unused, by the other margins)."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from facemoe_jax.losses import classifier, margins
from facemoe_jax.train.objectives.base import Objective

MARGINS = ("combined", "adaface")


def margin_fn_and_state(cfg, embeddings, margin_state):
    """The margin callable for the classifier loss, and the updated margin state."""
    if cfg.margin == "combined":
        fn = functools.partial(
            margins.combined_margin_logits, scale=cfg.scale, m1=cfg.m1, m2=cfg.m2, m3=cfg.m3
        )
        return fn, margin_state
    norms = jnp.linalg.norm(embeddings, axis=-1)
    # The running statistics are updated once; the logits use the updated values (AdaFace).
    mean, std = margins.adaface_update_stats(norms, margin_state["mean"], margin_state["std"])
    fn = functools.partial(
        margins.adaface_logits_given_stats,
        feature_norms=norms,
        mean=mean,
        std=std,
        margin=cfg.adaface_margin,
        h=cfg.adaface_h,
        scale=cfg.scale,
    )
    return fn, {"mean": mean, "std": std}


class MarginObjective(Objective):
    name = "margin"

    @classmethod
    def check_config(cls, config):
        if config.loss.margin not in MARGINS:
            raise ValueError(f"config.loss.margin={config.loss.margin!r} is not one of {MARGINS}")

    @classmethod
    def active(cls, config):
        return True

    @classmethod
    def init_aux(cls, config, num_rows):
        return {
            "mean": jnp.asarray(margins.ADAFACE_INITIAL_MEAN, jnp.float32),
            "std": jnp.asarray(margins.ADAFACE_INITIAL_STD, jnp.float32),
        }

    def loss(self, ctx, params, state, batch, forward, frozen):
        cfg = ctx.config.loss
        margin_fn, margin_state = margin_fn_and_state(cfg, forward.embeddings, state.aux[self.name])
        margin_ce, cls_metrics = classifier.sharded_margin_classifier_loss(
            forward.embeddings,
            params["classifier"]["centers"],
            batch["label"],
            forward.sample_rng,
            sample_rate=cfg.sample_rate,
            margin_fn=margin_fn,
            num_classes=ctx.config.data.num_classes,
            class_axes=ctx.class_axes,
        )
        metrics = {
            "train/margin_ce": margin_ce,
            "train/accuracy": cls_metrics["accuracy"],
            # The highest share of its classes any class shard kept (Partial FC).
            "train/partial_fc_rate": jnp.max(cls_metrics["partial_fc/effective_rate"]),
        }
        return margin_ce, metrics, margin_state
