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
    `DroplessDispatcher` sorts the T*K (token, expert) assignments by expert into blocks of
    rows, each block holding one expert's rows (an expert's rows padded to whole blocks, R rows
    in all, a static bound for any routing), so every token is processed and each expert only
    computes its own rows (`grouped_matmul.block_expert_mlp`: on XLA:CPU `jax.lax.ragged_dot`
    is lowered densely, every row through every expert). Both dispatchers have the same
    `dispatch()` / `combine()` / `kept` / `run_experts()` interface, so callers never branch on
    the dispatcher type;
  * the expert network: `Experts` holds E MLPs as stacked (E, ...) weights. Stacking (rather than
    `nn.vmap` over a Dense) lets the same parameters serve both the batched (E, N, D) einsum of the
    capacity path and the block-grouped MLP of the dropless path, and gives the expert axis a
    name that sharding rules can match (`.../experts/...`).

Also R: padded dispatch rows of the dropless path (blocks of B rows).

Combine rules (`top_k_routing`): "softmax_topk" (softmax over the K chosen logits; with K=1 the
weight is always 1 and the router gets no gradient from the task loss, so the config check
refuses it), "softmax_all" (softmax over all E logits, then the K chosen probabilities:
Switch/vmoe), "raw_logits" (the official FaceMoE rule). The K weighted expert outputs are summed
in float32 whatever the activation dtype (as the official float32 model does).

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
from facemoe_jax.kernels import grouped_matmul
from facemoe_jax.parallel import expert_parallel
from facemoe_jax.parallel.expert_parallel import batch_shard_count, per_batch_shard

Array = jax.Array

COMBINE_MODES = ("softmax_topk", "softmax_all", "raw_logits")


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
        "softmax_all": the softmax over all E logits, taken at the K chosen experts (Switch,
        vmoe); "raw_logits": the official FaceMoE rule, the chosen raw logits themselves.
    Returns:
      expert_index (..., K) int32 ordered from best to K-th choice, combine_weights (..., K) float32.
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"moe combine mode {combine!r} is not one of {COMBINE_MODES}")
    top_logits, expert_index = jax.lax.top_k(logits, top_k)
    if combine == "softmax_topk":
        weights = jax.nn.softmax(top_logits, axis=-1)
    elif combine == "softmax_all":
        weights = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), expert_index, axis=-1)
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
        """(G, E, C, D) expert outputs -> (G, S, D) weighted sum over each token's kept choices,
        accumulated in float32."""
        _, e, c, d = y.shape
        w = jnp.where(self.kept, self.weights, 0.0)

        def one_group(outputs, flat_slot, weights):  # (E, C, D), (S, K), (S, K)
            rows = jnp.concatenate([outputs.reshape(e * c, d), jnp.zeros((1, d), y.dtype)])
            return jnp.einsum(
                "sk,skd->sd", weights, rows[flat_slot], preferred_element_type=jnp.float32
            )

        return jax.vmap(one_group)(y, self._flat_slot(), w).astype(y.dtype)

    def run_experts(self, buffers: Array, weights, activation) -> Array:
        """The E expert MLPs on the (G, E, C, D) buffers (expert-parallel under a mesh)."""
        return expert_parallel.capacity_experts(
            lambda b, w: expert_mlp(b, w, activation), buffers, weights
        )

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
    """Puts the T*K (token, expert) assignments into expert-sorted blocks of rows; none dropped.

    Expert e's rows start at block `block_start[e]` and fill `ceil(group_sizes[e] / B)` blocks
    (the last one padded with zero rows); R = `num_rows` is a static bound for any routing
    (T*K + E*(B-1) rounded up to whole blocks). Assignments are sorted stably, so within an
    expert, rows follow token order (first choices and second choices interleaved by token).

    row: (G, S, K) int32, the dispatch row of each assignment; weights: (G, S, K) float32
    combine weights; group_sizes: (E,) assignments per expert.
    """

    row: Array
    weights: Array
    group_sizes: Array
    num_rows: int = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False)

    @property
    def kept(self) -> Array:
        return jnp.ones(self.row.shape, bool)

    def dispatch(self, x: Array) -> Array:
        """(G, S, D) -> (R, D) token copies in expert blocks; padding rows are zeros."""
        g, s, d = x.shape
        k = self.row.shape[-1]
        tokens = jnp.concatenate([x.reshape(g * s, d), jnp.zeros((1, d), x.dtype)])
        token_of_row = jnp.full((self.num_rows,), g * s, jnp.int32)
        token_of_row = token_of_row.at[self.row.reshape(-1)].set(
            jnp.repeat(jnp.arange(g * s, dtype=jnp.int32), k), unique_indices=True
        )
        return tokens[token_of_row]

    def combine(self, y: Array) -> Array:
        """(R, D) expert outputs -> (G, S, D) weighted sum over each token's K choices,
        accumulated in float32."""
        per_choice = y[self.row]  # (G, S, K, D)
        out = jnp.einsum(
            "gsk,gskd->gsd", self.weights, per_choice, preferred_element_type=jnp.float32
        )
        return out.astype(y.dtype)

    def run_experts(self, rows: Array, weights, activation) -> Array:
        """The E expert MLPs on the (R, D) expert-sorted rows (expert-parallel under a mesh)."""
        return expert_parallel.dropless_experts(
            lambda r, segments, w: grouped_matmul.block_expert_mlp(
                r, w, *segments, self.block_size, activation
            ),
            rows,
            self.group_sizes,
            weights,
            self.block_size,
        )


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
    expert_index: Array, weights: Array, num_experts: int, block_size: int | None = None
) -> DroplessDispatcher:
    """Places the (G, S, K) choices in expert-sorted blocks of rows (nothing dropped).

    block_size: rows per block (B); by default `grouped_matmul.choose_block_size`.
    """
    g, s, k = expert_index.shape
    assignments = g * s * k
    if block_size is None:
        block_size = grouped_matmul.choose_block_size(assignments, num_experts)
    flat_expert = expert_index.reshape(-1)  # (T*K,), assignment a = token * K + choice
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    block_start, _ = grouped_matmul.block_layout(group_sizes, block_size)
    # Rank of each assignment among its expert's (stable: token order), then its padded row.
    order = jnp.argsort(flat_expert, stable=True)
    group_offset = jnp.cumsum(group_sizes) - group_sizes
    rank_sorted = jnp.arange(assignments, dtype=jnp.int32) - group_offset[flat_expert[order]]
    rank = jnp.zeros((assignments,), jnp.int32).at[order].set(rank_sorted, unique_indices=True)
    row = block_start[flat_expert] * block_size + rank
    return DroplessDispatcher(
        row=row.reshape(g, s, k).astype(jnp.int32),
        weights=weights.astype(jnp.float32),
        group_sizes=group_sizes,
        num_rows=grouped_matmul.padded_rows(assignments, num_experts, block_size),
        block_size=block_size,
    )


def router_metrics(
    logits: Array, expert_index: Array, kept: Array, device_groups: int = 1
) -> dict[str, Array]:
    """Auxiliary losses and diagnostics of one MoE layer (all float32 scalars, expert_load (E,)).

    logits (G, S, E) for G images. The `.../per_device` balance losses split the G images into
    `device_groups` consecutive blocks (the devices' shares of the batch), compute the loss of
    each block and average them: the official DDP semantics (`config.loss.aux_statistics`).
    The z-losses are means over tokens, equal either way for equal blocks.
    """
    num_experts = logits.shape[-1]
    chosen = jax.nn.one_hot(expert_index, num_experts).sum(axis=-2)  # (G, S, E)
    probs = jax.nn.softmax(logits, axis=-1)

    def grouped(fn):
        split = lambda a: a.reshape(device_groups, -1, num_experts)  # noqa: E731
        return jnp.mean(jax.vmap(fn)(split(probs), split(chosen)))

    flat_logits = logits.reshape(-1, num_experts)
    return {
        "router_z_loss": routing.router_z_loss(flat_logits),
        "load_balance_loss": routing.load_balance_loss(probs, chosen),
        "load_balance_loss/per_device": grouped(routing.load_balance_loss),
        "official_router_z_loss": routing.official_router_z_loss(flat_logits),
        "official_load_balance_loss": routing.official_load_balance_loss(probs, chosen),
        "official_load_balance_loss/per_device": grouped(routing.official_load_balance_loss),
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
        metrics = router_metrics(
            logits, expert_index, dispatcher.kept, batch_shard_count(x.shape[0])
        )
        return dispatcher, metrics


def expert_mlp(
    x: Array,
    weights: tuple[Array, Array, Array, Array],
    activation: Callable[[Array], Array],
) -> Array:
    """E two-layer MLPs on capacity buffers: x (G, E, C, D) -> (G, E, C, D), expert e applied to
    x[:, e]; weights (fc1 (E, D, H), fc1 bias (E, H), fc2 (E, H, D), fc2 bias (E, D))."""
    w1, b1, w2, b2 = weights
    # One (G*C, D) x (D, H) matmul per expert, on rows made contiguous per expert: about a
    # third faster on CPU than letting the einsum batch over a strided expert axis.
    g, e, c, d = x.shape
    rows = x.transpose(1, 0, 2, 3).reshape(e, g * c, d)
    hidden = activation(jnp.einsum("end,edh->enh", rows, w1) + b1[:, None])
    out = jnp.einsum("enh,ehd->end", hidden, w2) + b2[:, None]
    return out.reshape(e, g, c, -1).transpose(1, 0, 2, 3)


class Experts(nn.Module):
    """E two-layer MLPs (D -> H -> D, with biases) stored as stacked (E, ...) weights."""

    num_experts: int
    hidden_dim: int
    activation: Callable[[Array], Array] = jax.nn.relu6
    dtype: Any = jnp.float32
    kernel_init: Callable[..., Any] = nn.initializers.truncated_normal(0.02)

    @nn.compact
    def __call__(self, x: Array, dispatcher: CapacityDispatcher | DroplessDispatcher) -> Array:
        """The experts on what `dispatcher.dispatch` made: capacity buffers (G, E, C, D) or
        expert-sorted rows (R, D).

        Under a mesh with an `expert` axis the weights are split over it and the tokens travel
        to them (`expert_parallel`); otherwise the MLPs run on local arrays.
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
        return dispatcher.run_experts(x, weights, self.activation)


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
        y = experts(dispatched, dispatcher)
        out = per_batch_shard(lambda d, outputs: d.combine(outputs), groups, dispatcher, y)
        return out.astype(x.dtype), metrics
