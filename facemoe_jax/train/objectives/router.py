"""The MoE router's auxiliary losses: z_coef * router z-loss + balance_coef * load-balance loss,
each averaged (or summed, `config.loss.aux_reduce="sum"`, the official FaceMoE convention) over
the MoE blocks. The router computes the per-block statistics (models/moe.py); this objective
only weighs them. Always active: a dense model logs zeros."""

from __future__ import annotations

import jax.numpy as jnp

from facemoe_jax.train.objectives.base import Objective

Z_LOSS_KEYS = {"st_moe": "router_z_loss", "official": "official_router_z_loss"}
BALANCE_KEYS = {"switch": "load_balance_loss", "official": "official_load_balance_loss"}
# Whose tokens the load-balance loss counts: the global batch's, or each device's share averaged
# over devices (the official DDP recipe: one loss per GPU, gradients averaged).
AUX_STATISTICS = ("global", "per_device")


def balance_key(cfg) -> str:
    key = BALANCE_KEYS[cfg.load_balance_loss]
    return key + "/per_device" if cfg.aux_statistics == "per_device" else key


def router_summary(router_metrics: dict, reduce: str) -> dict:
    """Per-block router metrics (leading axis = MoE block) -> scalars for the loss and the logs."""
    if not router_metrics:
        return {}
    combine = jnp.sum if reduce == "sum" else jnp.mean
    per_device = [key + "/per_device" for key in BALANCE_KEYS.values()]
    summary = {
        key: combine(router_metrics[key])
        for key in (*Z_LOSS_KEYS.values(), *BALANCE_KEYS.values(), *per_device)
    }
    summary["router_entropy"] = jnp.mean(router_metrics["router_entropy"])
    summary["dropped_fraction"] = jnp.mean(router_metrics["dropped_fraction"])
    # Share of assignments taken by the busiest expert of the busiest block (1/E when balanced).
    summary["expert_load_max"] = jnp.max(router_metrics["expert_load"])
    return summary


class RouterObjective(Objective):
    name = "router"

    @classmethod
    def check_config(cls, config):
        cfg = config.loss
        for field, known in (
            ("router_z_loss", sorted(Z_LOSS_KEYS)),
            ("load_balance_loss", sorted(BALANCE_KEYS)),
            ("aux_reduce", ["mean", "sum"]),
            ("aux_statistics", list(AUX_STATISTICS)),
        ):
            if cfg[field] not in known:
                raise ValueError(f"config.loss.{field}={cfg[field]!r} is not one of {known}")

    @classmethod
    def active(cls, config):
        return True

    def loss(self, ctx, params, state, batch, forward, frozen):
        cfg = ctx.config.loss
        router = router_summary(forward.router_metrics, cfg.aux_reduce)
        z_loss = router.get(Z_LOSS_KEYS[cfg.router_z_loss], 0.0)
        balance = router.get(balance_key(cfg), 0.0)
        metrics = {
            "train/router_z_loss": z_loss,
            "train/load_balance_loss": balance,
            **{f"router/{k}": v for k, v in router.items()},
        }
        return cfg.z_coef * z_loss + cfg.balance_coef * balance, metrics, None
