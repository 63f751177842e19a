"""The jitted train step: one forward pass, the sum of the active objectives' losses, one update.

total = sum over the active objectives (train/objectives/, in their registered order: margin
softmax, router losses, then any method's terms) of each objective's loss. Losses and the margin
softmax are float32 whatever the activation dtype. The step knows no objective by name: each one
prepares before the gradient (advancing its entry of `TrainState.aux`, adding batch entries),
then adds its loss inside the differentiated function.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from facemoe_jax.core.images import normalize_images
from facemoe_jax.parallel import sharding
from facemoe_jax.train import objectives as objectives_lib
from facemoe_jax.train import trainable as trainable_lib
from facemoe_jax.train.objectives import Forward, StepContext
from facemoe_jax.train.state import TrainState


def quality_input(model, images, given):
    """The per-image quality `a` a quality-mixed LoRA model needs (None for other models)."""
    lora, settings = getattr(model, "lora", None), getattr(model, "quality", None)
    if settings is None:
        return None
    return settings.resolve(images, given, lora)


def _context(model, config) -> StepContext:
    return StepContext(model, config, sharding.class_axes(config.sharding_rules))


def prepare(objectives, ctx: StepContext, state: TrainState, batch: dict, frozen: dict):
    """(state with every objective's aux entry advanced, batch with their additions)."""
    aux = dict(state.aux)
    for objective in objectives:
        entry, batch = objective.prepare(
            ctx, state.replace(aux=aux), batch, frozen.get(objective.name)
        )
        if entry is not None:
            aux[objective.name] = entry
    return state.replace(aux=aux), batch


def make_loss_fn(model, config: ml_collections.ConfigDict, objectives=None):
    """loss_fn(params, state, batch, frozen=None) -> (total loss, (batch_stats, aux, metrics)).

    The differentiable half of the train step, separate so that tests can compare gradients
    across meshes. `state` is the prepared one (`prepare`). Randomness (dropout, Partial FC
    sampling) derives from fold_in(rng, step). objectives: the run's (`objectives.build`);
    None = the registered ones active for `config` that need no frozen input.
    """
    if objectives is None:
        objectives = objectives_lib.build(config)
    ctx = _context(model, config)

    def loss_fn(params, state: TrainState, batch: dict, frozen=None):
        frozen = frozen or {}
        rng = jax.random.fold_in(state.rng, state.step)
        dropout_rng, sample_rng = jax.random.split(rng)
        images = normalize_images(batch["image"])
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
        forward = Forward(images, embeddings, router_metrics, dropout_rng, sample_rng)
        total, metrics, aux = None, {}, dict(state.aux)
        for objective in objectives:
            loss, terms, entry = objective.loss(
                ctx, params, state, batch, forward, frozen.get(objective.name)
            )
            total = loss if total is None else total + loss
            metrics.update(terms)
            if entry is not None:
                aux[objective.name] = entry
        metrics["train/loss"] = total
        if quality is not None:
            metrics["quality/a_mean"] = jnp.mean(quality)
            metrics["quality/a_std"] = jnp.std(quality)
            metrics["quality/a_min"] = jnp.min(quality)
            metrics["quality/a_max"] = jnp.max(quality)
        return total, (mutated.get("batch_stats", {}), aux, metrics)

    return loss_fn


def make_train_step(model, config: ml_collections.ConfigDict, optimizer, schedule, objectives=None):
    """Returns train_step(state, batch, frozen=None) -> (state, metrics); jit it with the state
    donated. `frozen` maps an objective's name to its frozen arrays (a distillation teacher):
    an argument, never part of the state, so it needs no optimiser state and no checkpoint.

    Under `jax.set_mesh(mesh)` the MoE layers run expert-parallel and the classifier runs
    class-sharded (`parallel/expert_parallel.py`, `losses/classifier.py`); without a mesh the
    same function runs on one device.

    Frozen parameters (`config.train.trainable`) are carried over untouched (not `p + 0`), so
    they stay bit-identical and XLA drops their gradient computation; the BatchNorm running
    statistics of fully frozen layers are carried over too unless
    `config.train.update_batch_stats` (PETALface's `backbone.train()` behaviour).
    """
    if objectives is None:
        objectives = objectives_lib.build(config)
    loss_fn = make_loss_fn(model, config, objectives)
    ctx = _context(model, config)
    patterns = config.train.trainable
    update_frozen_stats = bool(config.train.update_batch_stats)

    def train_step(state: TrainState, batch: dict, frozen=None):
        """A non-finite loss or gradient leaves the state unchanged but for its step."""
        frozen = frozen or {}
        prepared, batch = prepare(objectives, ctx, state, batch, frozen)
        grads, (batch_stats, aux, metrics) = jax.grad(loss_fn, has_aux=True)(
            state.params, prepared, batch, frozen
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
            return state.replace(
                step=state.step + 1,
                params=params,
                batch_stats=batch_stats,
                opt_state=opt_state,
                aux=aux,
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
