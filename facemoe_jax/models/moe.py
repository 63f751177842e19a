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
from facemoe_jax.parallel import expert_parallel
from facemoe_jax.parallel.expert_parallel import per_batch_shard

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
    """Moves tokens into fixed-size (E, C) expert buffers and back, by slot indices.

    Each of the (G, S, K) assignments has an expert, a slot in that expert's buffer and a kept
    flag (False when the buffer was full). Moving data by scatter/gather costs O(S*K*D) per
    group, against O(S*E*C*D) for vmoe's one-hot einsums; `combine_weights` still gives that
    dense (G, S, E, C) tensor for inspection.
    """

    expert_index: Array  # (G, S, K) int32
    slot: Array  # (G, S, K) int32, position in the expert's buffer
    kept: Array  # (G, S, K) bool
    weights: Array  # (G, S, K) float32 combine weights
    num_experts: int = struct.field(pytree_node=False)
    capacity: int = struct.field(pytree_node=False)

    def _flat_slot(self) -> Array:
        """(G, S, K) row in the group's (E*C + 1) rows; dropped assignments go to the last row."""
        trash = self.num_experts * self.capacity
        return jnp.where(self.kept, self.expert_index * self.capacity + self.slot, trash)

    def dispatch(self, x: Array) -> Array:
        """(G, S, D) -> (G, E, C, D): each group's expert buffers, empty slots are zeros."""
        e, c = self.num_experts, self.capacity

        def one_group(tokens, flat_slot):  # (S, D), (S, K)
            s, d = tokens.shape
            rows = jnp.zeros((e * c + 1, d), tokens.dtype)
            copies = jnp.broadcast_to(tokens[:, None], (s, flat_slot.shape[-1], d))
            return rows.at[flat_slot].set(copies)[:-1].reshape(e, c, d)

        # vmap over groups (rather than an explicit group index) makes the group a batch
        # dimension of the scatter, which the SPMD partitioner keeps local to each device.
        return jax.vmap(one_group)(x, self._flat_slot())

    def combine(self, y: Array) -> Array:
        """(G, E, C, D) expert outputs -> (G, S, D) weighted sum over each token's kept choices."""
        _, e, c, d = y.shape
        w = jnp.where(self.kept, self.weights, 0.0).astype(y.dtype)

        def one_group(outputs, flat_slot, weights):  # (E, C, D), (S, K), (S, K)
            rows = jnp.concatenate([outputs.reshape(e * c, d), jnp.zeros((1, d), y.dtype)])
            return jnp.einsum("sk,skd->sd", weights, rows[flat_slot])

        return jax.vmap(one_group)(y, self._flat_slot(), w)

    @property
    def combine_weights(self) -> Array:
        """(G, S, E, C): the weight of token s in slot c of expert e, zero elsewhere."""
        one_hot = jax.nn.one_hot(self._flat_slot(), self.num_experts * self.capacity + 1)
        w = jnp.where(self.kept, self.weights, 0.0)
        dense = jnp.einsum("gskr,gsk->gsr", one_hot, w)[..., :-1]
        g, s = w.shape[:2]
        return dense.reshape(g, s, self.num_experts, self.capacity)


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
) -> CapacityDispatcher:
    """Assigns the (G, S, K) choices to slots of (E, C) expert buffers.

    Priority: all tokens' first choices take slots before any second choice (in token order
    within a choice), so a full expert drops the least preferred assignments first (Switch/vmoe).
    """
    g, s, k = expert_index.shape
    choice = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # (G, S, K, E)
    by_priority = choice.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)
    position = jnp.cumsum(by_priority, axis=1) - 1  # slot each assignment would take
    position = position.reshape(g, k, s, num_experts).transpose(0, 2, 1, 3)  # (G, S, K, E)
    slot = jnp.sum(position * choice, axis=-1).astype(jnp.int32)  # (G, S, K)
    return CapacityDispatcher(
        expert_index=expert_index,
        slot=slot,
        kept=slot < capacity,
        weights=weights.astype(jnp.float32),
        num_experts=num_experts,
        capacity=capacity,
    )


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
        self.sow("intermediates", "router_logits", logits)  # read by evaluate/routing_map.py
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(
                x.shape[1], self.num_experts, self.top_k, self.capacity_factor
            )

        def route(group_logits):
            expert_index, weights = top_k_routing(group_logits, self.top_k, self.combine)
            if capacity is None:
                return expert_index, dropless_dispatcher(expert_index, weights, self.num_experts)
            return expert_index, capacity_dispatcher(
                expert_index, weights, self.num_experts, capacity
            )

        # Routing is per image, so each device routes its own images (expert_parallel.py).
        expert_index, dispatcher = per_batch_shard(route, x.shape[0], logits)
        if isinstance(dispatcher, CapacityDispatcher):
            kept = dispatcher.kept
        else:
            kept = jnp.ones(expert_index.shape, bool)
        return dispatcher, router_metrics(logits, expert_index, kept)


def expert_mlp(
    x: Array,
    weights: tuple[Array, Array, Array, Array],
    activation: Callable[[Array], Array],
    group_sizes: Array | None = None,
) -> Array:
    """E two-layer MLPs, weights (fc1 (E, D, H), fc1 bias (E, H), fc2 (E, H, D), fc2 bias (E, D)).

    Batched (capacity path): x (G, E, C, D) -> (G, E, C, D), expert e applied to x[:, e].
    Grouped (dropless path): x (N, D) rows sorted by expert, group_sizes (E,) -> (N, D); rows
    after the last group (sum(group_sizes) <= N) come out as the fc2 bias of the last expert and
    are ignored by the caller.
    """
    w1, b1, w2, b2 = weights
    if group_sizes is None:
        # One (G*C, D) x (D, H) matmul per expert, on rows made contiguous per expert: about a
        # third faster on CPU than letting the einsum batch over a strided expert axis.
        g, e, c, d = x.shape
        rows = x.transpose(1, 0, 2, 3).reshape(e, g * c, d)
        hidden = activation(jnp.einsum("end,edh->enh", rows, w1) + b1[:, None])
        out = jnp.einsum("enh,ehd->end", hidden, w2) + b2[:, None]
        return out.reshape(e, g, c, -1).transpose(1, 0, 2, 3)
    e = w1.shape[0]
    expert_of_row = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=x.shape[0])
    hidden = activation(jax.lax.ragged_dot(x, w1, group_sizes) + b1[expert_of_row])
    return jax.lax.ragged_dot(hidden, w2, group_sizes) + b2[expert_of_row]


class Experts(nn.Module):
    """E two-layer MLPs (D -> H -> D, with biases) stored as stacked (E, ...) weights."""

    num_experts: int
    hidden_dim: int
    activation: Callable[[Array], Array] = jax.nn.relu6
    dtype: Any = jnp.float32
    kernel_init: Callable[..., Any] = nn.initializers.truncated_normal(0.02)

    @nn.compact
    def __call__(self, x: Array, group_sizes: Array | None = None) -> Array:
        """Capacity buffers (G, E, C, D), or expert-sorted rows (N, D) with group_sizes (E,).

        Under a mesh with an `expert` axis the weights are split over it and the tokens travel
        to them (`expert_parallel`); otherwise this is `expert_mlp` on local arrays.
        """
        e, h, width = self.num_experts, self.hidden_dim, x.shape[-1]
        weights = tuple(
            jnp.asarray(w, self.dtype)
            for w in (
                self.param("fc1_kernel", self.kernel_init, (e, width, h)),
                self.param("fc1_bias", nn.initializers.zeros, (e, h)),
                self.param("fc2_kernel", self.kernel_init, (e, h, width)),
                self.param("fc2_bias", nn.initializers.zeros, (e, width)),
            )
        )
        if group_sizes is None:
            return expert_parallel.capacity_experts(
                lambda b, w: expert_mlp(b, w, self.activation), x, weights
            )
        return expert_parallel.dropless_experts(
            lambda r, g, w: expert_mlp(r, w, self.activation, g), x, group_sizes, weights
        )


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
        groups = x.shape[0]
        dispatched = per_batch_shard(lambda d, tokens: d.dispatch(tokens), groups, dispatcher, x)
        if isinstance(dispatcher, DroplessDispatcher):
            y = experts(dispatched, dispatcher.group_sizes)
        else:
            y = experts(dispatched)
        out = per_batch_shard(lambda d, outputs: d.combine(outputs), groups, dispatcher, y)
        return out.astype(x.dtype), metrics
