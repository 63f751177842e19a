"""MoE routing, dispatch and experts against hand-computed values and a per-token numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.models import grouped_matmul, moe


def test_expert_capacity_rounds_up():
    assert moe.expert_capacity(tokens_per_group=3, num_experts=2, top_k=1, capacity_factor=1.0) == 2
    assert moe.expert_capacity(144, 8, 2, 1.25) == 45
    assert moe.expert_capacity(1, 8, 1, 0.1) == 1


def test_top_k_routing_softmax_and_raw_logit_weights():
    logits = jnp.array([[0.5, 2.0, -1.0], [1.0, 1.0, 3.0]])
    index, weights = moe.top_k_routing(logits, 2, "softmax_topk")
    np.testing.assert_array_equal(index, [[1, 0], [2, 0]])
    e = np.exp([2.0, 0.5])
    np.testing.assert_allclose(weights[0], e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(weights[1], np.exp([3.0, 1.0]) / np.exp([3.0, 1.0]).sum(), rtol=1e-6)
    _, raw = moe.top_k_routing(logits, 2, "raw_logits")
    np.testing.assert_allclose(raw, [[2.0, 0.5], [3.0, 1.0]])
    with pytest.raises(ValueError, match="combine mode"):
        moe.top_k_routing(logits, 2, "sigmoid")


# G=2 groups, S=3 tokens, E=2 experts, capacity C=2. Group 1 sends all three first choices to
# expert 0, so its third token overflows.
TOP1_INDEX = np.array([[[0], [0], [1]], [[0], [0], [0]]])


def test_capacity_dispatch_top1_exact_tensor():
    weights = jnp.full(TOP1_INDEX.shape, 0.5)
    dispatcher = moe.capacity_dispatcher(
        jnp.asarray(TOP1_INDEX), weights, num_experts=2, capacity=2
    )
    expected = np.zeros((2, 3, 2, 2))
    expected[0, 0, 0, 0] = expected[0, 1, 0, 1] = expected[0, 2, 1, 0] = 0.5
    expected[1, 0, 0, 0] = expected[1, 1, 0, 1] = 0.5  # token (1, 2) dropped
    np.testing.assert_array_equal(dispatcher.combine_weights, expected)
    np.testing.assert_array_equal(
        dispatcher.kept[..., 0], [[True, True, True], [True, True, False]]
    )

    x = jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 1) + 1.0  # tokens 1..6
    buffers = dispatcher.dispatch(x)  # (G, E, C, D)
    np.testing.assert_array_equal(buffers[..., 0], [[[1, 2], [3, 0]], [[4, 5], [0, 0]]])
    out = dispatcher.combine(buffers * 10.0)
    np.testing.assert_allclose(out[..., 0], [[5, 10, 15], [20, 25, 0]])


def test_capacity_dispatch_top2_first_choices_have_priority():
    # Group 0: every token prefers expert 0 then expert 1; C=2 leaves token 2 with nothing.
    index = jnp.array([[[0, 1], [0, 1], [0, 1]]])
    weights = jnp.array([[[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]]])
    dispatcher = moe.capacity_dispatcher(index, weights, num_experts=2, capacity=2)
    kept = dispatcher.kept
    np.testing.assert_array_equal(kept[0], [[True, True], [True, True], [False, False]])
    cw = np.asarray(dispatcher.combine_weights[0])
    np.testing.assert_allclose(cw[0], [[0.7, 0], [0.3, 0]])
    np.testing.assert_allclose(cw[1], [[0, 0.6], [0, 0.4]])
    np.testing.assert_allclose(cw[2], 0)

    # A second choice never takes a slot before all first choices are placed.
    index = jnp.array([[[1, 0], [0, 1], [0, 1]]])
    dispatcher = moe.capacity_dispatcher(index, weights, num_experts=2, capacity=2)
    kept = dispatcher.kept
    # Expert 0: first choices of tokens 1, 2 fill it, so token 0's second choice is dropped.
    # Expert 1: token 0's first choice, then token 1's second; token 2's second overflows.
    np.testing.assert_array_equal(kept[0], [[True, False], [True, True], [True, False]])


def test_dropless_dispatch_round_trip():
    index = jnp.array([[[1, 0], [0, 2], [2, 1]]])  # G=1, S=3, K=2, E=3
    weights = jnp.array([[[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]]])
    dispatcher = moe.dropless_dispatcher(index, weights, num_experts=3, block_size=2)
    np.testing.assert_array_equal(dispatcher.group_sizes, [2, 2, 2])
    x = jnp.array([[[1.0], [2.0], [3.0]]])
    rows = dispatcher.dispatch(x)
    # Sorted by expert: expert 0 gets tokens 0 and 1, expert 1 tokens 0 and 2, expert 2 tokens 1, 2;
    # the static row count holds any routing in whole blocks (6 + 3 * (2 - 1) -> 10), rest zeros.
    assert rows.shape == (10, 1)
    np.testing.assert_array_equal(rows[:, 0], [1, 2, 1, 3, 2, 3, 0, 0, 0, 0])
    expert_scale = jnp.array([1.0, 1.0, 10.0, 10.0, 100.0, 100.0, 0, 0, 0, 0])[:, None]
    out = dispatcher.combine(rows * expert_scale)
    expected = [1 * (0.6 * 10 + 0.4 * 1), 2 * (0.5 * 1 + 0.5 * 100), 3 * (0.9 * 100 + 0.1 * 10)]
    np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-6)


def test_dropless_dispatch_pads_each_expert_to_whole_blocks():
    # Expert 0: 3 rows -> 2 blocks of 2 (one zero row); expert 1: none; expert 2: 3 rows.
    index = jnp.array([[[0, 2], [2, 0], [0, 2]]])
    dispatcher = moe.dropless_dispatcher(index, jnp.ones((1, 3, 2)), num_experts=3, block_size=2)
    rows = dispatcher.dispatch(jnp.array([[[1.0], [2.0], [3.0]]]))
    np.testing.assert_array_equal(rows[:8, 0], [1, 2, 3, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(dispatcher.row[0], [[0, 4], [5, 1], [2, 6]])
    assert not bool(jnp.any(rows[8:]))


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


def _numpy_moe(x, params, num_experts, top_k, combine):
    """Per-token reference: out_t = sum over chosen e of w_e * MLP_e(x_t)."""
    gate = np.asarray(params["router"]["gate"]["kernel"], np.float64)
    ex = {k: np.asarray(v, np.float64) for k, v in params["experts"].items()}
    tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    out = np.zeros_like(tokens)
    for t, token in enumerate(tokens):
        logits = token @ gate
        chosen = np.argsort(-logits, kind="stable")[:top_k]
        w = logits[chosen]
        if combine == "softmax_topk":
            w = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
        elif combine == "softmax_all":
            w = (np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())[chosen]
        for e, we in zip(chosen, w):
            h = np.clip(token @ ex["fc1_kernel"][e] + ex["fc1_bias"][e], 0, 6)
            out[t] += we * (h @ ex["fc2_kernel"][e] + ex["fc2_bias"][e])
    return out.reshape(x.shape)


@pytest.mark.parametrize("combine", ["softmax_topk", "softmax_all", "raw_logits"])
@pytest.mark.parametrize("capacity_factor", [None, 4.0])
def test_moe_layer_matches_per_token_reference(combine, capacity_factor):
    layer = moe.MoEFeedForward(
        num_experts=4, top_k=2, hidden_dim=16, combine=combine, capacity_factor=capacity_factor
    )
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    variables = layer.init(jax.random.key(1), x)
    # Larger router weights make the top-k choice unambiguous for the float64 reference.
    variables = jax.tree.map(lambda v: v * 10.0, variables)
    y, metrics = layer.apply(variables, x)
    expected = _numpy_moe(x, variables["params"], 4, 2, combine)
    np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-4)
    assert float(metrics["dropped_fraction"]) == 0.0


def test_dropless_and_capacity_paths_agree_in_value_and_gradient():
    x = jax.random.normal(jax.random.key(2), (3, 6, 8))
    dropless = moe.MoEFeedForward(num_experts=3, top_k=2, hidden_dim=12)
    capacity = moe.MoEFeedForward(num_experts=3, top_k=2, hidden_dim=12, capacity_factor=3.0)
    variables = dropless.init(jax.random.key(3), x)

    def loss(params, layer):
        y, _ = layer.apply({"params": params}, x)
        return jnp.sum(jnp.sin(y))

    l1, g1 = jax.value_and_grad(loss)(variables["params"], dropless)
    l2, g2 = jax.value_and_grad(loss)(variables["params"], capacity)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)
    assert float(jnp.abs(g1["experts"]["fc1_kernel"]).sum()) > 0
    assert float(jnp.abs(g1["router"]["gate"]["kernel"]).sum()) > 0


def test_router_metrics_count_loads_and_drops():
    layer = moe.MoEFeedForward(num_experts=2, top_k=1, hidden_dim=4, capacity_factor=1.0)
    x = jnp.ones((2, 3, 4))  # identical tokens: all choose the same expert, capacity 2 of 3
    variables = layer.init(jax.random.key(0), x)
    _, metrics = layer.apply(variables, x)
    np.testing.assert_allclose(metrics["dropped_fraction"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(np.sort(metrics["expert_load"]), [0.0, 1.0])
    logits = np.asarray(x.reshape(-1, 4) @ variables["params"]["router"]["gate"]["kernel"])
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(metrics["router_z_loss"], np.mean(lse**2), rtol=1e-5)
    np.testing.assert_allclose(metrics["official_router_z_loss"], np.mean(logits**2), rtol=1e-5)


def test_router_math_is_float32_under_bfloat16():
    layer = moe.MoEFeedForward(num_experts=4, top_k=2, hidden_dim=8, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 4, 8)).astype(jnp.bfloat16)
    variables = layer.init(jax.random.key(1), x)
    y, metrics = layer.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    assert metrics["router_z_loss"].dtype == jnp.float32
    assert variables["params"]["experts"]["fc1_kernel"].dtype == jnp.float32


def test_impossible_top_k_is_a_clear_error():
    layer = moe.MoEFeedForward(num_experts=2, top_k=3, hidden_dim=4)
    with pytest.raises(ValueError, match="top_k=3 must be between 1 and num_experts=2"):
        layer.init(jax.random.key(0), jnp.ones((1, 2, 4)))


def test_softmax_all_weights_are_the_full_softmax_at_the_chosen_experts():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    index, w = moe.top_k_routing(logits, 2, "softmax_all")
    p = np.exp([2.0, 1.0, 0.0, -1.0]) / np.exp([2.0, 1.0, 0.0, -1.0]).sum()
    np.testing.assert_array_equal(index, [[0, 1]])
    np.testing.assert_allclose(w, [p[:2]], rtol=1e-6)
    # With K=1 the router still gets a gradient from the task loss (softmax_topk's weight is 1).
    grad = jax.grad(lambda x: moe.top_k_routing(x, 1, "softmax_all")[1].sum())(logits)
    assert float(jnp.abs(grad).sum()) > 0


def test_softmax_topk_with_one_choice_is_refused_by_the_config_check():
    from configs import common
    from facemoe_jax.models import build_model

    config = common.get_base_config()
    config.model.update(top_k=1, router_combine="softmax_topk", moe_layers="all")
    with pytest.raises(ValueError, match="softmax_topk' with config.model.top_k=1") as err:
        build_model(config.model)
    assert "\n" not in str(err.value)
    config.model.router_combine = "softmax_all"
    build_model(config.model)


@pytest.mark.parametrize("capacity_factor", [None, 4.0])
def test_expert_outputs_are_summed_in_float32_under_bfloat16(capacity_factor):
    """The K weighted bfloat16 outputs are summed with float32 weights in float32 and rounded to
    bfloat16 once: equal to the float64 sum rounded once (bfloat16 weights or a bfloat16
    running sum miss it on many tokens)."""
    rng = np.random.default_rng(0)
    g, s, k, e, d = 2, 32, 2, 4, 8
    index = jnp.asarray(np.argsort(rng.random((g, s, e)), axis=-1)[..., :k].astype(np.int32))
    weights = jnp.asarray(rng.uniform(0.05, 1.0, (g, s, k)).astype(np.float32))
    if capacity_factor is None:
        dispatcher = moe.dropless_dispatcher(index, weights, num_experts=e, block_size=4)
        y = rng.normal(size=(dispatcher.num_rows, d))
        chosen = lambda y: y[np.asarray(dispatcher.row)]  # noqa: E731
    else:
        dispatcher = moe.capacity_dispatcher(index, weights, num_experts=e, capacity=s)
        y = rng.normal(size=(g, e, s, d))
        flat = np.asarray(dispatcher._flat_slot())
        chosen = lambda y: np.stack([y[i].reshape(e * s, d)[flat[i]] for i in range(g)])  # noqa
    y = jnp.asarray(y, jnp.bfloat16)
    out = dispatcher.combine(y)
    assert out.dtype == jnp.bfloat16
    y64 = chosen(np.asarray(y, np.float64))
    exact = np.einsum("gsk,gskd->gsd", np.asarray(weights, np.float64), y64)
    expected = np.asarray(jnp.asarray(exact.astype(np.float32)).astype(jnp.bfloat16), np.float64)
    np.testing.assert_array_equal(np.asarray(out, np.float64), expected)


def test_chunk_sizes_and_choices():
    assert grouped_matmul.chunk_sizes(8) == (8, 4, 2, 1)
    assert grouped_matmul.chunk_sizes(1) == (1,)
    for bad in (0, 3, 6):
        with pytest.raises(ValueError, match=f"max_chunk_blocks={bad} is not a power of two"):
            grouped_matmul.chunk_sizes(bad)
    # Chunks shrink as the hidden width grows (a chunk's hidden block stays cache-sized), within
    # 256..1024 rows; blocks are small where there are many rows, smaller where there are few.
    assert [grouped_matmul.choose_chunk_rows(h) for h in (96, 384, 768, 1536, 6144)] == [
        1024, 1024, 512, 256, 256,
    ]  # fmt: skip
    assert grouped_matmul.choose_block_size(12800, 3) == 32
    assert grouped_matmul.choose_block_size(64, 8) == 8
