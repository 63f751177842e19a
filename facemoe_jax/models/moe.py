"""Mixture-of-Experts feed-forward: a top-k router, token dispatch, and stacked expert MLPs.

Axis letters used in every einsum and shape comment of this module:
  G  groups (one group per image: routing capacity is counted per image)
  S  tokens per group
  E  experts
  C  capacity: tokens one expert accepts from one group
  K  choices per token (top-k)
  D  model width
  H  expert hidden width
  T  all tokens, G * S

Three pieces change independently:
  * routing policy: `TopKRouter` turns tokens into router logits and picks K experts per token;
    it returns a dispatcher and the router metrics (z-loss, balance loss, load, entropy, drops);
  * data movement: a dispatcher moves tokens to experts and back. `CapacityDispatcher` is the
    vmoe/Switch path (one-hot (G, S, E, C) tensors, tokens over capacity are dropped and counted);
    `DroplessDispatcher` sorts the T*K (token, expert) assignments by expert so every token is
    processed, and the experts run as one grouped matmul (`jax.lax.ragged_dot`);
  * the expert network: `Experts` holds E MLPs as stacked (E, ...) weights. Stacking (rather than
    `nn.vmap` over a Dense) lets the same parameters serve both the batched (E, N, D) einsum of the
    capacity path and the ragged grouped matmul of the dropless path, and gives the expert axis a
    name that sharding rules can match (`.../experts/...`).

Router math is float32 even when activations are bfloat16: top-k on low-precision logits flips
choices between nearly tied experts, and the auxiliary losses square the logits.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from facemoe_jax.losses import routing

Array = jax.Array

COMBINE_MODES = ("softmax_topk", "raw_logits")


def expert_capacity(
    tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float
) -> int:
    """Tokens one expert takes from one group: ceil(factor * S * K / E), at least 1."""
    return max(1, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts))


def top_k_routing(logits: Array, top_k: int, combine: str) -> tuple[Array, Array]:
    """Chooses K experts per token and their combine weights.

    Args:
      logits: (..., E) float32 router logits.
      top_k: K.
      combine: "softmax_topk": weights are the softmax over the K chosen logits (they sum to 1);
        "raw_logits": the official FaceMoE rule, the chosen raw logits themselves.
    Returns:
      expert_index (..., K) int32 ordered from best to K-th choice, combine_weights (..., K) float32.
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"moe combine mode {combine!r} is not one of {COMBINE_MODES}")
    top_logits, expert_index = jax.lax.top_k(logits, top_k)
    if combine == "softmax_topk":
        weights = jax.nn.softmax(top_logits, axis=-1)
    else:
        weights = top_logits
    return expert_index.astype(jnp.int32), weights


@struct.dataclass
class CapacityDispatcher:
    """Moves tokens to fixed-size expert buffers with one-hot tensors (vmoe's dense dispatch).

    combine_weights: (G, S, E, C) float32, the weight of token s in slot c of expert e; zero where
    the token was not sent there (not chosen, or dropped because the buffer was full).
    """

    combine_weights: Array

    def dispatch(self, x: Array) -> Array:
        """(G, S, D) -> (E, G*C, D): each expert's buffer, empty slots are zeros."""
        mask = (self.combine_weights != 0).astype(x.dtype)
        buffers = jnp.einsum("gsec,gsd->egcd", mask, x)
        e, g, c, d = buffers.shape
        return buffers.reshape(e, g * c, d)

    def combine(self, y: Array) -> Array:
        """(E, G*C, D) expert outputs -> (G, S, D) weighted sum over each token's chosen experts."""
        g, _, e, c = self.combine_weights.shape
        y = y.reshape(e, g, c, y.shape[-1])
        return jnp.einsum("gsec,egcd->gsd", self.combine_weights.astype(y.dtype), y)


@struct.dataclass
class DroplessDispatcher:
    """Sorts the T*K (token, expert) assignments by expert; every assignment is processed.

    order: (T*K,) permutation that sorts assignments by expert; token_of_assignment (T*K,);
    group_sizes: (E,) assignments per expert; weights: (T*K,) combine weight of each assignment.
    """

    order: Array
    token_of_assignment: Array
    group_sizes: Array
    weights: Array
    shape: tuple[int, int] = struct.field(pytree_node=False)  # (G, S)

    def dispatch(self, x: Array) -> Array:
        """(G, S, D) -> (T*K, D) token copies, contiguous per expert."""
        tokens = x.reshape(-1, x.shape[-1])
        return tokens[self.token_of_assignment[self.order]]

    def combine(self, y: Array) -> Array:
        """(T*K, D) expert outputs in sorted order -> (G, S, D)."""
        per_assignment = jnp.zeros_like(y).at[self.order].set(y)
        weighted = per_assignment * self.weights[:, None].astype(y.dtype)
        g, s = self.shape
        tokens = jnp.zeros((g * s, y.shape[-1]), y.dtype).at[self.token_of_assignment].add(weighted)
        return tokens.reshape(g, s, -1)


def capacity_dispatcher(
    expert_index: Array, weights: Array, num_experts: int, capacity: int
) -> tuple[CapacityDispatcher, Array]:
    """Builds the one-hot dispatch of (G, S, K) choices into (E, C) slots.

    Priority: all tokens' first choices take slots before any second choice (in token order within a
    choice), so a full expert drops the least preferred assignments first (Switch/vmoe behaviour).
    Returns the dispatcher and the (G, S, K) bool mask of kept assignments.
    """
    g, s, k = expert_index.shape
    choice = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # (G, S, K, E)
    by_priority = choice.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)  # (G, K*S, E)
    position = jnp.cumsum(by_priority, axis=1) - 1  # slot each assignment would take
    position = position.reshape(g, k, s, num_experts).transpose(0, 2, 1, 3)  # (G, S, K, E)
    slot = jnp.sum(position * choice, axis=-1)  # (G, S, K)
    kept = slot < capacity
    slot_one_hot = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)
    # (G, S, K, E) x (G, S, K, C) -> (G, S, E, C); dropped assignments have an all-zero slot row.
    combine = jnp.einsum(
        "gske,gskc,gsk->gsec", choice.astype(jnp.float32), slot_one_hot, weights.astype(jnp.float32)
    )
    return CapacityDispatcher(combine_weights=combine), kept


def dropless_dispatcher(
    expert_index: Array, weights: Array, num_experts: int
) -> DroplessDispatcher:
    """Builds the sorted-assignment dispatch of (G, S, K) choices (no capacity, nothing dropped)."""
    g, s, k = expert_index.shape
    flat_expert = expert_index.reshape(-1)  # (T*K,), assignment a = token * K + choice
    order = jnp.argsort(flat_expert, stable=True)
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    token_of_assignment = jnp.repeat(jnp.arange(g * s, dtype=jnp.int32), k)
    return DroplessDispatcher(
        order=order,
        token_of_assignment=token_of_assignment,
        group_sizes=group_sizes,
        weights=weights.reshape(-1),
        shape=(g, s),
    )


def router_metrics(logits: Array, expert_index: Array, kept: Array) -> dict[str, Array]:
    """Auxiliary losses and diagnostics of one MoE layer (all float32 scalars, expert_load (E,))."""
    num_experts = logits.shape[-1]
    logits = logits.reshape(-1, num_experts)
    probs = jax.nn.softmax(logits, axis=-1)
    chosen = jax.nn.one_hot(expert_index.reshape(logits.shape[0], -1), num_experts).sum(axis=1)
    return {
        "router_z_loss": routing.router_z_loss(logits),
        "load_balance_loss": routing.load_balance_loss(probs, chosen),
        "official_router_z_loss": routing.official_router_z_loss(logits),
        "official_load_balance_loss": routing.official_load_balance_loss(probs, chosen),
        "router_entropy": routing.router_entropy(probs),
        "expert_load": routing.expert_load_fractions(chosen),
        "dropped_fraction": 1.0 - jnp.mean(kept.astype(jnp.float32)),
    }


class TopKRouter(nn.Module):
    """Router: a bias-free Dense to E logits per token, then top-k choice and dispatch.

    capacity_factor=None selects the dropless path.
    """

    num_experts: int
    top_k: int
    combine: str = "softmax_topk"
    capacity_factor: float | None = None
    kernel_init: Callable[..., Any] = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: Array):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe top_k={self.top_k} must be between 1 and num_experts={self.num_experts}"
            )
        logits = nn.Dense(
            self.num_experts,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=self.kernel_init,
            name="gate",
        )(x.astype(jnp.float32))  # (G, S, E)
        expert_index, weights = top_k_routing(logits, self.top_k, self.combine)
        if self.capacity_factor is None:
            dispatcher = dropless_dispatcher(expert_index, weights, self.num_experts)
            kept = jnp.ones(expert_index.shape, bool)
        else:
            capacity = expert_capacity(
                x.shape[1], self.num_experts, self.top_k, self.capacity_factor
            )
            dispatcher, kept = capacity_dispatcher(
                expert_index, weights, self.num_experts, capacity
            )
        return dispatcher, router_metrics(logits, expert_index, kept)


class Experts(nn.Module):
    """E two-layer MLPs (D -> H -> D, with biases) stored as stacked (E, ...) weights."""

    num_experts: int
    hidden_dim: int
    activation: Callable[[Array], Array] = jax.nn.relu6
    dtype: Any = jnp.float32
    kernel_init: Callable[..., Any] = nn.initializers.truncated_normal(0.02)

    @nn.compact
    def __call__(self, x: Array, group_sizes: Array | None = None) -> Array:
        """Batched: x (E, N, D) -> (E, N, D), expert e applied to row block e.

        Grouped (dropless): x (N, D) rows sorted by expert and group_sizes (E,) -> (N, D).
        """
        e, h, width = self.num_experts, self.hidden_dim, x.shape[-1]
        w1, b1, w2, b2 = (
            jnp.asarray(w, self.dtype)
            for w in (
                self.param("fc1_kernel", self.kernel_init, (e, width, h)),
                self.param("fc1_bias", nn.initializers.zeros, (e, h)),
                self.param("fc2_kernel", self.kernel_init, (e, h, width)),
                self.param("fc2_bias", nn.initializers.zeros, (e, width)),
            )
        )
        if group_sizes is None:
            hidden = self.activation(jnp.einsum("end,edh->enh", x, w1) + b1[:, None])
            return jnp.einsum("enh,ehd->end", hidden, w2) + b2[:, None]
        expert_of_row = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=x.shape[0])
        hidden = self.activation(jax.lax.ragged_dot(x, w1, group_sizes) + b1[expert_of_row])
        return jax.lax.ragged_dot(hidden, w2, group_sizes) + b2[expert_of_row]


class MoEFeedForward(nn.Module):
    """The MoE replacement of a transformer block's MLP: (G, S, D) -> ((G, S, D), metrics)."""

    num_experts: int
    top_k: int
    hidden_dim: int
    combine: str = "softmax_topk"
    capacity_factor: float | None = None
    activation: Callable[[Array], Array] = jax.nn.relu6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array):
        dispatcher, metrics = TopKRouter(
            self.num_experts, self.top_k, self.combine, self.capacity_factor, name="router"
        )(x)
        experts = Experts(
            self.num_experts, self.hidden_dim, self.activation, self.dtype, name="experts"
        )
        if isinstance(dispatcher, DroplessDispatcher):
            y = experts(dispatcher.dispatch(x), dispatcher.group_sizes)
        else:
            y = experts(dispatcher.dispatch(x))
        return dispatcher.combine(y).astype(x.dtype), metrics
