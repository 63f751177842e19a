"""The jitted train step: margin softmax over the class centres plus the router auxiliary losses.

total = margin CE + z_coef * router z-loss + balance_coef * load-balance loss (+ the
distillation terms when a frozen teacher is given: train/distill.py), where the router
losses of the MoE blocks are averaged (or summed, `config.loss.aux_reduce="sum"`, the official
FaceMoE convention) over blocks. Losses and the margin softmax are float32 whatever the
activation dtype. With config.recognizability.enabled the recognizability losses are added and
the unrecognizable-identity centre advances first (losses/recognizability.py).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from facemoe_jax.core.images import normalize_images
from facemoe_jax.losses import classifier, margins
from facemoe_jax.losses import recognizability
from facemoe_jax.parallel import sharding
from facemoe_jax.train import distill as distill_lib
from facemoe_jax.train import trainable as trainable_lib
from facemoe_jax.train.state import TrainState

Z_LOSS_KEYS = {"st_moe": "router_z_loss", "official": "official_router_z_loss"}
BALANCE_KEYS = {"switch": "load_balance_loss", "official": "official_load_balance_loss"}
# Whose tokens the load-balance loss counts: the global batch's, or each device's share averaged
# over devices (the official DDP recipe: one loss per GPU, gradients averaged).
AUX_STATISTICS = ("global", "per_device")


def balance_key(cfg) -> str:
    key = BALANCE_KEYS[cfg.load_balance_loss]
    return key + "/per_device" if cfg.get("aux_statistics", "global") == "per_device" else key


def check_loss_config(cfg: ml_collections.ConfigDict) -> None:
    if cfg.margin not in ("combined", "adaface"):
        raise ValueError(f"config.loss.margin={cfg.margin!r} is not 'combined' or 'adaface'")
    if cfg.router_z_loss not in Z_LOSS_KEYS:
        raise ValueError(
            f"config.loss.router_z_loss={cfg.router_z_loss!r} is not one of {sorted(Z_LOSS_KEYS)}"
        )
    if cfg.load_balance_loss not in BALANCE_KEYS:
        raise ValueError(
            f"config.loss.load_balance_loss={cfg.load_balance_loss!r} is not one of "
            f"{sorted(BALANCE_KEYS)}"
        )
    if cfg.aux_reduce not in ("mean", "sum"):
        raise ValueError(f"config.loss.aux_reduce={cfg.aux_reduce!r} is not 'mean' or 'sum'")
    if cfg.get("aux_statistics", "global") not in AUX_STATISTICS:
        raise ValueError(
            f"config.loss.aux_statistics={cfg.aux_statistics!r} is not one of {AUX_STATISTICS}"
        )


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


def router_summary(router_metrics: dict, reduce: str) -> dict:
    """Per-block router metrics (leading axis = MoE block) -> scalars for the loss and the logs."""
    if not router_metrics:
        return {}
    combine = jnp.sum if reduce == "sum" else jnp.mean
    summary = {
        key: combine(router_metrics[key])
        for key in (*Z_LOSS_KEYS.values(), *BALANCE_KEYS.values(), *_per_device(BALANCE_KEYS))
    }
    summary["router_entropy"] = jnp.mean(router_metrics["router_entropy"])
    summary["dropped_fraction"] = jnp.mean(router_metrics["dropped_fraction"])
    # Share of assignments taken by the busiest expert of the busiest block (1/E when balanced).
    summary["expert_load_max"] = jnp.max(router_metrics["expert_load"])
    return summary


def _per_device(keys: dict) -> list[str]:
    return [key + "/per_device" for key in keys.values()]


def quality_input(model, images, given):
    """The per-image quality `a` a quality-mixed LoRA model needs (None for other models)."""
    lora, settings = getattr(model, "lora", None), getattr(model, "quality", None)
    if settings is None:
        return None
    return settings.resolve(images, given, lora)


def make_loss_fn(model, config: ml_collections.ConfigDict, teacher=None):
    """loss_fn(params, state, batch, teacher_variables=None) -> (total loss, (batch_stats,
    margin_state, metrics)); `teacher` (train/distill.Teacher) adds the distillation terms.

    The differentiable half of the train step, separate so that tests can compare gradients
    across meshes. Randomness (dropout, Partial FC sampling) derives from fold_in(rng, step).
    """
    loss_cfg = config.loss
    check_loss_config(loss_cfg)
    recognizability.check_config(config)
    ri_on = recognizability.enabled(config)
    quality_head = bool(config.model.get("quality_head", False))
    class_axes = sharding.class_axes(config.sharding_rules)

    def loss_fn(params, state: TrainState, batch: dict, teacher_variables=None):
        rng = jax.random.fold_in(state.rng, state.step)
        dropout_rng, sample_rng = jax.random.split(rng)
        images = normalize_images(batch["image"])
        if "test_poison" in batch:  # test hook (loop.py, FACEMOE_TEST_NAN_STEPS): NaN images
            images = images + batch["test_poison"].astype(images.dtype)
        # PETALface's per-image `a`: from the batch when the pipeline supplies it, else from the
        # model's quality estimator; logged so its distribution can be checked.
        quality = quality_input(model, images, batch.get("quality"))
        (embeddings, router_metrics), mutated = model.apply(
            {"params": params["encoder"], "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
            **({} if quality is None else {"quality": quality}),
        )
        margin_fn, margin_state = margin_fn_and_state(loss_cfg, embeddings, state.margin_state)
        margin_ce, cls_metrics = classifier.sharded_margin_classifier_loss(
            embeddings,
            params["classifier"]["centers"],
            batch["label"],
            sample_rng,
            sample_rate=loss_cfg.sample_rate,
            margin_fn=margin_fn,
            num_classes=config.data.num_classes,
            class_axes=class_axes,
        )
        router = router_summary(router_metrics, loss_cfg.aux_reduce)
        z_loss = router.get(Z_LOSS_KEYS[loss_cfg.router_z_loss], 0.0)
        balance = router.get(balance_key(loss_cfg), 0.0)
        distill_loss, distill_metrics = distill_lib.loss_terms(
            teacher, teacher_variables, batch, embeddings
        )
        total = margin_ce + loss_cfg.z_coef * z_loss + loss_cfg.balance_coef * balance
        total = total + distill_loss
        ri_metrics = {}
        if ri_on:
            quality_fn = None if not quality_head else lambda f, patch: (
                recognizability.predict_quality(model, params["encoder"], f,
                                                jax.random.fold_in(dropout_rng, 1), patch))  # fmt: skip
            ri_loss, ri_metrics = recognizability.loss_terms(
                config.recognizability, embeddings, params["classifier"]["centers"],
                batch["label"], state.ri_centre, batch, quality_fn,
                num_classes=config.data.num_classes, class_axes=class_axes,
            )  # fmt: skip
            total = total + ri_loss
        metrics = {
            "train/loss": total,
            "train/margin_ce": margin_ce,
            "train/router_z_loss": z_loss,
            "train/load_balance_loss": balance,
            "train/accuracy": cls_metrics["accuracy"],
            # The highest share of its classes any class shard kept (Partial FC).
            "train/partial_fc_rate": jnp.max(cls_metrics["partial_fc/effective_rate"]),
            **{f"router/{k}": v for k, v in router.items()},
            **distill_metrics,
            **ri_metrics,
        }
        if quality is not None:
            metrics["quality/a_mean"] = jnp.mean(quality)
            metrics["quality/a_std"] = jnp.std(quality)
            metrics["quality/a_min"] = jnp.min(quality)
            metrics["quality/a_max"] = jnp.max(quality)
        return total, (mutated.get("batch_stats", {}), margin_state, metrics)

    return loss_fn


def make_train_step(model, config: ml_collections.ConfigDict, optimizer, schedule, teacher=None):
    """Returns train_step(state, batch, teacher_variables=None) -> (state, metrics); jit it with
    the state donated. With a distillation `teacher`, its frozen variables are the third
    argument (never part of the state: train/distill.py says why).

    Under `jax.set_mesh(mesh)` the MoE layers run expert-parallel and the classifier runs
    class-sharded (`parallel/expert_parallel.py`, `losses/classifier.py`); without a mesh the
    same function runs on one device.

    Frozen parameters (`config.train.trainable`) are carried over untouched (not `p + 0`), so
    they stay bit-identical and XLA drops their gradient computation; the BatchNorm running
    statistics of fully frozen layers are carried over too unless
    `config.train.update_batch_stats` (PETALface's `backbone.train()` behaviour).
    """
    loss_fn = make_loss_fn(model, config, teacher)
    ri_on = recognizability.enabled(config)
    class_axes = sharding.class_axes(config.sharding_rules)
    patterns = config.train.get("trainable", trainable_lib.ALL)
    update_frozen_stats = bool(config.train.get("update_batch_stats", False))

    def train_step(state: TrainState, batch: dict, teacher_variables=None):
        """A non-finite loss or gradient leaves the state unchanged but for its step."""
        # The unrecognizable-identity centre moves first; this step's loss uses the new one.
        # The batch gains the embeddings of its copies the quality head learns from.
        advanced = state
        if ri_on:
            advanced, batch = recognizability.with_copies(
                model, config, state, batch, normalize_images(batch["image"]), class_axes)  # fmt: skip
        grads, (batch_stats, margin_state, metrics) = jax.grad(loss_fn, has_aux=True)(
            state.params, advanced, batch, teacher_variables
        )
        mask = None
        if not trainable_lib.trains_everything(patterns):
            mask = trainable_lib.trainable_mask(state.params, patterns)  # static, at trace time
            grads = trainable_lib.select(mask, grads, jax.tree.map(jnp.zeros_like, grads))
            if not update_frozen_stats:
                batch_stats = _keep_frozen_statistics(
                    batch_stats, state.batch_stats, state.params, mask
                )
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/lr"] = schedule(state.step)

        def apply_update(state):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            if mask is not None:
                params = trainable_lib.select(mask, params, state.params)
            return advanced.replace(
                step=state.step + 1,
                params=params,
                batch_stats=batch_stats,
                opt_state=opt_state,
                margin_state=margin_state,
            )

        # A non-finite loss or gradient skips the update: everything but the step counter stays
        # as it was (the loop counts train/skipped and stops after config.train.max_bad_steps).
        # A cond, not a select over the whole state: the select is one more pass over every
        # parameter and optimiser moment each step (4 % of the small Swin-MoE step on CPU).
        finite = jnp.isfinite(metrics["train/loss"]) & jnp.isfinite(metrics["train/grad_norm"])
        new_state = jax.lax.cond(
            finite, apply_update, lambda state: state.replace(step=state.step + 1), state
        )
        metrics["train/skipped"] = 1.0 - finite.astype(jnp.float32)
        return new_state, metrics

    return train_step


def _keep_frozen_statistics(new_stats, old_stats, params, mask):
    """The old running statistics for BatchNorm layers whose parameters are all frozen."""
    frozen = trainable_lib.frozen_module_paths(params, mask)

    def pick(path, new, old):
        module = "encoder/" + sharding.path_name(path).rsplit("/", 1)[0]
        return old if module in frozen else new

    return jax.tree_util.tree_map_with_path(pick, new_stats, old_stats)
