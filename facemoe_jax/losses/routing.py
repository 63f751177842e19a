"""Auxiliary losses and diagnostics of a Mixture-of-Experts router.

Inputs are the router's float32 logits or softmax probabilities, shape ``(T, E)`` for ``T``
tokens and ``E`` experts, and the top-k choice as a ``(T, E)`` mask (1 where the token chose the
expert among its k). Extra leading dimensions (e.g. ``(batch, tokens, E)``) are flattened into
``T``. All functions are pure and return float32.

Two families are provided:

* the literature's definitions: ST-MoE router z-loss ``mean_t logsumexp(logits_t)**2`` and the
  Switch-Transformer load-balance loss ``E * sum_e f_e * P_e``;
* the ``official_*`` variants, exactly what the FaceMoE PyTorch code (Kartik-3004/FaceMoE,
  ``backbones/swin_moe.py``) computes per MoE layer, which differ in form and scale:
  z-loss ``mean(logits**2)`` over tokens x experts (the paper's algorithm sums over experts
  instead; neither is ST-MoE's); load balance ``E * sum_e importance_e * load_e / T**2`` with
  ``importance_e = sum_t softmax(logits_t)_e``, ``load_e`` = tokens that chose e among their top
  k and ``T`` the tokens of all images of the (per-GPU) batch.

None of them multiplies by a coefficient (FaceMoE uses 1e-3 for the z-loss, 1e-2 for the load
balance, then adds 10 x the sum over its 22 layers to the identity loss in the classifier-only and
full fine-tuning scripts; the WebFace pre-training script computes them but does not add them):
coefficients and the sum-or-mean over layers belong to the training config.

Whose tokens (a documented difference, not a bug): the official recipes train with PyTorch DDP on
8 GPUs and no SyncBatchNorm, so each GPU computes these losses from its own 128 images' tokens
and DDP averages the gradients: the official value is the *mean over GPUs of per-GPU losses*.
By default (``config.loss.aux_statistics="global"``) ``train/step.py`` uses them on the global
batch, so ``T`` is every token of the global batch; ``"per_device"`` takes the
``.../per_device`` values of ``models/moe.router_metrics``, which compute each device's loss
from its own images and average them (the official semantics). The z-loss is a mean over
tokens, so both give the same value when the devices hold equal batches; the load balance is a
product of two sums over tokens, so the two agree only when every device routes alike (the
global form has the cross-device products ``importance_g * load_h``, the per-device mean only
``g = h``). The BatchNorm layers of the embedding head (``feature_layer``: BatchNorm1d,
Dropout, Linear, BatchNorm1d) always use the global batch's statistics here, each GPU's in
official training (the running averages used at evaluation are what a checkpoint stores either
way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _as_tokens_by_experts(x: jax.Array) -> jax.Array:
    """Flatten any leading dimensions: (..., E) -> (T, E), float32."""
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(-1, x.shape[-1])


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE z-loss: ``mean_t (logsumexp_e logits_te)**2``; keeps router logits small."""
    logits = _as_tokens_by_experts(logits)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def official_router_z_loss(logits: jax.Array) -> jax.Array:
    """FaceMoE's z-loss as coded: ``mean(logits**2)`` over tokens x experts.

    The official code multiplies this by 1e-3; that coefficient lives in the config, not here.
    """
    logits = _as_tokens_by_experts(logits)
    return jnp.mean(logits**2)


def load_balance_loss(router_probs: jax.Array, expert_choice_mask: jax.Array) -> jax.Array:
    """Switch-Transformer load balance: ``E * sum_e f_e * P_e``.

    ``P_e = mean_t p_te`` (mean router probability) and ``f_e`` = share of the ``T * k``
    (token, choice) assignments that went to expert e. Equals 1 for perfectly uniform routing,
    up to E when everything goes to one expert.

    Args:
      router_probs: (..., E) softmax probabilities. expert_choice_mask: (..., E) 0/1 top-k mask.
    """
    probs = _as_tokens_by_experts(router_probs)
    mask = _as_tokens_by_experts(expert_choice_mask)
    num_experts = probs.shape[-1]
    mean_prob = jnp.mean(probs, axis=0)  # P_e
    assignment_share = jnp.sum(mask, axis=0) / jnp.sum(mask)  # f_e; sum(mask) = T * k
    return num_experts * jnp.sum(assignment_share * mean_prob)


def official_load_balance_loss(router_probs: jax.Array, expert_choice_mask: jax.Array) -> jax.Array:
    """FaceMoE's load balance as coded: ``E * sum_e importance_e * load_e / T**2``.

    ``importance_e = sum_t p_te``, ``load_e = sum_t mask_te`` (tokens that chose e among their
    top k). This is k times the Switch loss: uniform routing gives k, not 1. The official
    code multiplies it by 1e-2; that coefficient lives in the config, not here.
    """
    probs = _as_tokens_by_experts(router_probs)
    mask = _as_tokens_by_experts(expert_choice_mask)
    num_tokens, num_experts = probs.shape
    importance = jnp.sum(probs, axis=0)
    load = jnp.sum(mask, axis=0)
    return num_experts * jnp.sum(importance * load) / jnp.float32(num_tokens) ** 2


def router_entropy(router_probs: jax.Array) -> jax.Array:
    """Mean over tokens of ``-sum_e p log p`` (nats); 0 log 0 counts as 0. log(E) = uniform."""
    probs = _as_tokens_by_experts(router_probs)
    safe_log = jnp.log(jnp.where(probs > 0, probs, 1.0))
    return jnp.mean(-jnp.sum(probs * safe_log, axis=-1))


def expert_load_fractions(expert_choice_mask: jax.Array) -> jax.Array:
    """(E,) share of all (token, choice) assignments that each expert received; sums to 1."""
    mask = _as_tokens_by_experts(expert_choice_mask)
    return jnp.sum(mask, axis=0) / jnp.sum(mask)
