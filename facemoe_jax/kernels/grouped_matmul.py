"""Expert MLPs over expert-sorted rows in fixed-size blocks: the dropless MoE's expert compute.

`jax.lax.ragged_dot` has no native kernel on XLA:CPU: it is lowered densely (every row through
every group's weights, then masked), which costs E/K times the useful FLOPs and E/K times the
memory. Here the rows are laid out by the dispatcher in blocks of `block_size` rows, each block
belonging to one expert (an expert's rows are padded up to a whole number of blocks), and a
segment is a run of consecutive blocks that share an expert:

    x (R, D) with R = NB * block_size;  w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D)
    segment s: blocks [start[s], start[s] + count[s]) of x go through expert expert[s]

The MLPs run in nested loops with dynamic trip counts (segments, then chunks of their blocks),
so only the blocks that hold rows are computed: the cost is the useful work plus at most
`block_size - 1` padding rows per segment, whatever the routing. Blocks are small (the padding
unit) and the matmuls large: a segment's blocks go through the MLP in chunks of up to
`max_chunk_rows` rows (as many full chunks as fit, then one chunk of each smaller power-of-two
number of blocks). Blocks in no segment come out as zeros. Each chunk's (rows, H) hidden
activations stay inside the loop body (cache-resident); without a gradient (evaluation) nothing
of size (R, H) is ever written. Under differentiation the forward also stores the (R, H)
pre-activations for the backward pass (custom VJP, the same loops; `KEEP_HIDDEN = False`
recomputes them instead: the same speed at small widths, 20 % slower at width 384 on CPU),
which accumulates each chunk's weight gradients in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _check_rows(x: Array, block_size: int) -> None:
    if x.shape[0] % block_size:
        raise ValueError(f"{x.shape[0]} rows are not a whole number of {block_size}-row blocks")


KEEP_HIDDEN = True  # store the (R, H) pre-activations for the backward pass, or recompute them


def _vma(*arrays) -> tuple[str, ...]:
    """Mesh axes (inside `shard_map`) over which any of the arrays varies; () outside."""
    axes = set()
    for a in arrays:
        manual = getattr(jax.typeof(a), "manual_axis_type", None)
        axes |= set(manual.varying if manual is not None else getattr(jax.typeof(a), "vma", ()))
    return tuple(sorted(axes))


def _varying(x, axes):
    """x typed as varying over `axes` (a no-op outside `shard_map`): loop carries that start as
    constants must have the type of the values the loop writes into them."""
    missing = tuple(a for a in axes if a not in _vma(x))
    return lax.pcast(x, missing, to="varying") if missing else x


def _zeros(shape, dtype, axes):
    return _varying(jnp.zeros(shape, dtype), axes)


def chunk_sizes(max_chunk_blocks: int) -> tuple[int, ...]:
    """Chunk sizes in blocks, largest first: max_chunk_blocks (a power of two), half, ..., 1."""
    if max_chunk_blocks < 1 or max_chunk_blocks & (max_chunk_blocks - 1):
        raise ValueError(f"max_chunk_blocks={max_chunk_blocks} is not a power of two")
    return tuple(max_chunk_blocks >> i for i in range(max_chunk_blocks.bit_length()))


def _segment_loop(num_segments, start, count, chunks, body_fn, init):
    """Runs body_fn(s, first_block, num_blocks, carry) over chunks that cover every segment s's
    blocks: as many chunks of chunks[0] blocks as fit, then the rest in at most one chunk of
    each smaller size (a binary decomposition). num_blocks is static per call."""

    def segment(s, carry):
        first, remaining = start[s], count[s]
        for size in chunks:
            n = remaining // size
            carry = lax.fori_loop(
                0,
                n,
                lambda j, c, first=first, size=size: body_fn(s, first + j * size, size, c),
                carry,
            )
            first, remaining = first + n * size, remaining - n * size
        return carry

    return lax.fori_loop(0, num_segments, segment, init)


def _dot(a, b, contract):
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _rows(a, first_block, num_blocks, block_size):
    return lax.dynamic_slice_in_dim(a, first_block * block_size, num_blocks * block_size)


def _put_rows(a, value, first_block, block_size):
    return lax.dynamic_update_slice_in_dim(a, value.astype(a.dtype), first_block * block_size, 0)


def _mlp_forward(x, weights, expert, start, count, layout, activation, keep_hidden=False):
    """The fused chunk MLP; with keep_hidden also the (R, H) pre-activations (for the VJP)."""
    w1, b1, w2, b2 = weights
    block_size, chunks = layout
    _check_rows(x, block_size)
    axes = _vma(x, *weights, expert, start, count)
    y = _zeros((x.shape[0], w2.shape[2]), x.dtype, axes)
    pre_all = _zeros((x.shape[0], w1.shape[2]), x.dtype, axes) if keep_hidden else None

    def body(s, first, size, carry):
        y, pre_all = carry
        e = expert[s]
        xi = _rows(x, first, size, block_size)
        pre = _dot(xi, lax.dynamic_index_in_dim(w1, e, keepdims=False), ((1,), (0,)))
        pre = pre + lax.dynamic_index_in_dim(b1, e, keepdims=False).astype(jnp.float32)
        pre = pre.astype(x.dtype)
        if keep_hidden:
            pre_all = _put_rows(pre_all, pre, first, block_size)
        yi = _dot(activation(pre), lax.dynamic_index_in_dim(w2, e, keepdims=False), ((1,), (0,)))
        yi = yi + lax.dynamic_index_in_dim(b2, e, keepdims=False).astype(jnp.float32)
        return _put_rows(y, yi, first, block_size), pre_all

    return _segment_loop(expert.shape[0], start, count, chunks, body, (y, pre_all))


def block_expert_mlp(x, weights, expert, start, count, block_size, activation, max_chunk_rows=None):
    """Two-layer expert MLPs on expert-sorted blocks of rows, fused per chunk of blocks.

    x (R, D) rows, weights = (w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D)); every block b
    of segment s computes activation(x[b] @ w1[e] + b1[e]) @ w2[e] + b2[e] with e = expert[s].
    A segment's blocks run in chunks of up to `max_chunk_rows` rows (by default
    `choose_chunk_rows(H)`), so the matmuls are large even where the blocks, the padding unit,
    are small. The (chunk, H) hidden activations never leave the loop body in evaluation
    (memory O(R * D)); under differentiation the pre-activations are kept for the backward pass
    (see module). Blocks in no segment come out as zeros (no bias).

    Inside `shard_map` every operand is first typed as varying over the same mesh axes (for
    replicated weights the transpose of that cast is the psum of their gradient over devices).
    """
    if max_chunk_rows is None:
        max_chunk_rows = choose_chunk_rows(weights[0].shape[-1])
    # The largest power of two of blocks within both the chunk limit and the rows.
    chunk_blocks = min(max_chunk_rows // block_size, x.shape[0] // block_size)
    chunk_blocks = 1 << max(0, chunk_blocks.bit_length() - 1)
    layout = (block_size, chunk_sizes(chunk_blocks))
    axes = _vma(x, *weights, expert, start, count)
    x, weights, expert, start, count = jax.tree.map(
        lambda a: _varying(a, axes), (x, tuple(weights), expert, start, count)
    )
    return _block_expert_mlp(x, weights, expert, start, count, layout, activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _block_expert_mlp(x, weights, expert, start, count, layout, activation):
    return _mlp_forward(x, weights, expert, start, count, layout, activation)[0]


def _mlp_fwd(x, weights, expert, start, count, layout, activation):
    y, pre_all = _mlp_forward(
        x, weights, expert, start, count, layout, activation, keep_hidden=KEEP_HIDDEN
    )
    return y, (x, weights, expert, start, count, pre_all)


def _mlp_bwd(layout, activation, residuals, dy):
    x, (w1, b1, w2, b2), expert, start, count, pre_all = residuals
    block_size, chunks = layout
    dy = dy.astype(x.dtype)
    f32 = jnp.float32
    axes = _vma(x, dy, w1, b1, w2, b2, expert, start, count)
    init = (
        _zeros(x.shape, x.dtype, axes),
        _zeros(w1.shape, f32, axes),
        _zeros(b1.shape, f32, axes),
        _zeros(w2.shape, f32, axes),
        _zeros(b2.shape, f32, axes),
    )

    def body(s, first, size, carry):
        dx, dw1, db1, dw2, db2 = carry
        e = expert[s]
        w1e = lax.dynamic_index_in_dim(w1, e, keepdims=False)
        w2e = lax.dynamic_index_in_dim(w2, e, keepdims=False)
        xi = _rows(x, first, size, block_size)
        gi = _rows(dy, first, size, block_size)
        if pre_all is not None:
            pre = _rows(pre_all, first, size, block_size)
        else:
            pre = _dot(xi, w1e, ((1,), (0,))) + lax.dynamic_index_in_dim(b1, e, keepdims=False)
            pre = pre.astype(x.dtype)
        h, act_vjp = jax.vjp(activation, pre)
        dh = _dot(gi, w2e, ((1,), (1,))).astype(x.dtype)
        (dpre,) = act_vjp(dh)
        dx = _put_rows(dx, _dot(dpre, w1e, ((1,), (1,))), first, block_size)

        def add(acc, value):
            return lax.dynamic_update_index_in_dim(
                acc, lax.dynamic_index_in_dim(acc, e, keepdims=False) + value, e, 0
            )

        dw2 = add(dw2, _dot(h, gi, ((0,), (0,))))
        db2 = add(db2, jnp.sum(gi.astype(f32), axis=0))
        dw1 = add(dw1, _dot(xi, dpre, ((0,), (0,))))
        db1 = add(db1, jnp.sum(dpre.astype(f32), axis=0))
        return dx, dw1, db1, dw2, db2

    dx, dw1, db1, dw2, db2 = _segment_loop(expert.shape[0], start, count, chunks, body, init)
    grads = tuple(g.astype(w.dtype) for g, w in zip((dw1, db1, dw2, db2), (w1, b1, w2, b2)))
    return dx, grads, None, None, None


_block_expert_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def blocks_per_group(group_sizes: Array, block_size: int) -> Array:
    """(E,) rows per expert -> (E,) blocks per expert (ceil)."""
    return (group_sizes + block_size - 1) // block_size


def block_layout(group_sizes: Array, block_size: int) -> tuple[Array, Array]:
    """(E,) rows per expert -> (first block of each expert (E,), blocks of each expert (E,))."""
    count = blocks_per_group(group_sizes, block_size).astype(jnp.int32)
    start = jnp.cumsum(count) - count
    return start.astype(jnp.int32), count


def padded_rows(num_assignments: int, num_experts: int, block_size: int) -> int:
    """Static row count that holds any routing of `num_assignments` rows in whole blocks."""
    blocks = -(-(num_assignments + num_experts * (block_size - 1)) // block_size)
    return blocks * block_size


def choose_block_size(num_assignments: int, num_experts: int) -> int:
    """Rows per block, the unit each expert's rows are padded to: small, so that the padding (at
    most block_size - 1 rows per expert) costs little; the matmuls take chunks of many blocks
    (`choose_chunk_rows`)."""
    block = 32
    while block > 8 and num_experts * block > num_assignments // 4:
        block //= 2
    return block


def choose_chunk_rows(hidden: int) -> int:
    """Most rows one matmul of the expert loops takes: 1024, or fewer where a chunk's (rows, H)
    float32 hidden activations would pass ~1.5 MiB (about a core's L2 on the development CPU),
    but not below 256. Measured fwd+bwd on that CPU with realistic routing: at H = 384 / 768 /
    1536, chunks of 1024 / 512 / 256 rows run 7-20 % faster than 256 / 128 / 64-row blocks;
    2048 rows at H = 384 run slower than 1024; at H = 3072, 256 rows beat 128."""
    rows = 1024
    while rows > 256 and rows * hidden * 4 > 3 * 2**19:
        rows //= 2
    return rows
