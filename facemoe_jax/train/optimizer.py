"""Optimiser and learning-rate schedule from `config.optimizer`."""

import ml_collections
import optax


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


def build_optimizer(
    cfg: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled decay) or SGD with momentum and coupled L2 decay (PyTorch's SGD), both
    after global-norm clipping, which PyTorch recipes apply to the raw gradients."""
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
    if cfg.grad_clip_norm > 0:
        update = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), update)
    return update, schedule
