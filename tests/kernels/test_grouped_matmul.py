"""The dropless MoE's expert kernel: block layout, chunking, value and gradient against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.kernels import grouped_matmul


@pytest.mark.parametrize(
    "keep_hidden, sizes, block, max_chunk_rows, layout",
    [
        # An empty expert and partial last blocks; chunks of up to 4 blocks: one chunk each.
        (True, [5, 0, 7], 4, None, ([0, 2, 2], [2, 0, 2])),
        (False, [5, 0, 7], 4, None, ([0, 2, 2], [2, 0, 2])),
        # 7 blocks in chunks of 2 blocks (3 x 2 + 1), of 4 (4 + 2 + 1) and one block at a time.
        (True, [13, 0, 4, 1], 2, 4, ([0, 7, 7, 9], [7, 0, 2, 1])),
        (True, [13, 0, 4, 1], 2, 8, ([0, 7, 7, 9], [7, 0, 2, 1])),
        (False, [13, 0, 4, 1], 2, 2, ([0, 7, 7, 9], [7, 0, 2, 1])),
    ],
)
def test_block_expert_mlp_matches_numpy_in_value_and_gradient(
    keep_hidden, sizes, block, max_chunk_rows, layout, monkeypatch
):
    """Blocks of expert-sorted rows run in chunks of several blocks, an empty expert and a
    partial last block, against numpy block by block (backward from stored or recomputed
    pre-activations)."""
    monkeypatch.setattr(grouped_matmul, "KEEP_HIDDEN", keep_hidden)
    rng = np.random.default_rng(0)
    sizes = np.array(sizes)
    e, d, h = len(sizes), 4, 6
    start, count = grouped_matmul.block_layout(jnp.asarray(sizes), block)
    np.testing.assert_array_equal(start, layout[0])
    np.testing.assert_array_equal(count, layout[1])
    num_rows = grouped_matmul.padded_rows(int(sizes.sum()), e, block)
    x = rng.normal(size=(num_rows, d)).astype(np.float32)
    w = [rng.normal(size=s).astype(np.float32) for s in [(e, d, h), (e, h), (e, h, d), (e, d)]]
    dy = rng.normal(size=(num_rows, d)).astype(np.float32)
    expert_of_block = np.full(num_rows // block, -1)
    for ex in range(e):
        expert_of_block[int(start[ex]) : int(start[ex] + count[ex])] = ex

    def numpy_mlp(x, w1, b1, w2, b2):  # float64, block by block; blocks of no expert are zero
        y = np.zeros((num_rows, d))
        for b, ex in enumerate(expert_of_block):
            if ex >= 0:
                rows = slice(b * block, (b + 1) * block)
                y[rows] = np.tanh(x[rows] @ w1[ex] + b1[ex]) @ w2[ex] + b2[ex]
        return y

    segments = (jnp.arange(e, dtype=jnp.int32), start, count)

    def loss(x, weights):
        y = grouped_matmul.block_expert_mlp(x, weights, *segments, block, jnp.tanh, max_chunk_rows)
        return jnp.sum(y * dy), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, tuple(w))
    w64 = [a.astype(np.float64) for a in w]
    np.testing.assert_allclose(y, numpy_mlp(x.astype(np.float64), *w64), rtol=1e-5, atol=1e-5)
    # Numerical gradients (central differences in float64) of sum(y * dy).
    flat = [x.astype(np.float64)] + w64
    for i, analytic in enumerate([grads[0], *grads[1]]):
        num = np.zeros_like(flat[i])
        for idx in np.ndindex(flat[i].shape):
            plus = [a.copy() for a in flat]
            minus = [a.copy() for a in flat]
            plus[i][idx] += 1e-6
            minus[i][idx] -= 1e-6
            num[idx] = (np.sum(numpy_mlp(*plus) * dy) - np.sum(numpy_mlp(*minus) * dy)) / 2e-6
        np.testing.assert_allclose(analytic, num, rtol=1e-3, atol=1e-3)


def test_chunk_sizes_and_choices():
    assert grouped_matmul.chunk_sizes(8) == (8, 4, 2, 1)
    assert grouped_matmul.chunk_sizes(1) == (1,)
    for bad in (0, 3, 6):
        with pytest.raises(ValueError, match=f"max_chunk_blocks={bad} is not a power of two"):
            grouped_matmul.chunk_sizes(bad)
    # Chunks shrink as the hidden width grows (a chunk's hidden block stays cache-sized), within
    # 256..1024 rows; blocks are small where there are many rows, smaller where there are few.
    chunk_rows = {96: 1024, 384: 1024, 768: 512, 1536: 256, 6144: 256}  # hidden width -> rows
    assert {h: grouped_matmul.choose_chunk_rows(h) for h in chunk_rows} == chunk_rows
    assert grouped_matmul.choose_block_size(12800, 3) == 32
    assert grouped_matmul.choose_block_size(64, 8) == 8
