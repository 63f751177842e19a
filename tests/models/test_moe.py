"""MoE routing, dispatch and experts against hand-computed values and a per-token numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.models import moe


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
