"""Optimiser and learning-rate schedule from `config.optimizer` (and `config.train.trainable`)."""

import jax
import ml_collections
import optax

from facemoe_jax.parallel.sharding import path_name
from facemoe_jax.train import trainable as trainable_lib


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then polynomial decay to `end_learning_rate` at the last
    step (power 1 = linear, the FaceMoE recipe; power 2 = arcface_torch's PolyScheduler).

    A run shorter than its warm-up (a smoke test with --config.train.num_steps=2) stays on the
    warm-up ramp, as the PyTorch schedulers do.
    """
    warmup = int(cfg.warmup_steps)
    if warmup < 0:
        raise ValueError(f"config.optimizer.warmup_steps={warmup} must be >= 0")
    decay = optax.polynomial_schedule(
        init_value=cfg.learning_rate,
        end_value=cfg.end_learning_rate,
        power=cfg.decay_power,
        transition_steps=max(num_steps - warmup, 1),
    )
    if warmup == 0:
        return decay
    ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
    return optax.join_schedules([ramp, decay], boundaries=[warmup])


CLIP_SCOPES = ("all", "encoder")


def build_optimizer(
    cfg: ml_collections.ConfigDict, num_steps: int, trainable=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled decay) or SGD with momentum and coupled L2 decay (PyTorch's SGD), after
    gradient-norm clipping of the raw gradients.

    `cfg.clip_scope`: "all" clips the global norm over every trained parameter; "encoder" clips
    only the encoder's gradients and never the class centres, as the official FaceMoE and
    insightface scripts do (`clip_grad_norm_(backbone.parameters(), 5)`).
    `trainable` (`config.train.trainable` regexes, None = everything): frozen parameters go
    through `optax.set_to_zero`, so they have no optimiser state, no weight decay and do not
    count in the clipped norm (the train step also keeps them bit-identical).
    """
    schedule = learning_rate_schedule(cfg, num_steps)
    if cfg.name == "adamw":
        update = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        update = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay),
            optax.sgd(schedule, momentum=cfg.momentum),
        )
    else:
        raise ValueError(f"config.optimizer.name={cfg.name!r} is not 'adamw' or 'sgd'")
    if cfg.grad_clip_norm < 0:
        raise ValueError(f"config.optimizer.grad_clip_norm={cfg.grad_clip_norm} must be >= 0")
    scope = cfg.clip_scope
    if scope not in CLIP_SCOPES:
        raise ValueError(f"config.optimizer.clip_scope={scope!r} is not one of {CLIP_SCOPES}")
    if cfg.grad_clip_norm > 0:
        clip = optax.clip_by_global_norm(cfg.grad_clip_norm)
        if scope == "encoder":
            clip = optax.masked(clip, _encoder_mask)
        update = optax.chain(clip, update)
    if trainable is not None and not trainable_lib.trains_everything(trainable):
        patterns = trainable_lib.parse_patterns(trainable)

        def labels(params):
            mask = trainable_lib.trainable_mask(params, patterns)
            return jax.tree.map(lambda m: "trained" if m else "frozen", mask)

        update = optax.multi_transform({"trained": update, "frozen": optax.set_to_zero()}, labels)
    return update, schedule


def _encoder_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path_name(path).startswith("encoder/"), params
    )
