"""Winograd F(2x2, 3x3): against a numpy convolution, the dispatch of its lax drop-in, and the
IResNet's evaluation forward with it against the direct convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facemoe_jax.kernels import winograd
from facemoe_jax.models.iresnet import IResNet, inference_conv


def numpy_conv3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Stride 1, zero padding 1, NHWC x HWIO, in float64: sum over the 9 shifted windows."""
    b, h, wd, _ = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, wd, w.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + wd] @ w[i, j].astype(np.float64)
    return out


@pytest.mark.parametrize("height, width", [(8, 8), (7, 7), (5, 6), (1, 3)])
def test_conv3x3_equals_the_direct_convolution(height, width):
    """Even and odd sizes (the last tile row and column padded and cropped), against numpy in
    float64, to float32 rounding."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, height, width, 5)).astype(np.float32)
    w = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
    got = np.asarray(jax.jit(winograd.conv3x3)(x, w))
    want = numpy_conv3x3(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_kernel_transform_is_g_w_gt():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    g = winograd.KERNEL_TRANSFORM.astype(np.float64)
    want = np.stack(
        [np.stack([g @ w[:, :, c, k] @ g.T for k in range(3)], -1) for c in range(2)], -2
    )
    np.testing.assert_allclose(np.asarray(winograd.transform_kernel(w)), want, rtol=1e-6, atol=1e-6)


def test_conv3x3_rejects_a_kernel_of_another_shape():
    with pytest.raises(ValueError, match=r"kernel \(5, 5, 3, 4\) is not \(3, 3, 3, K\)"):
        winograd.conv3x3(jnp.zeros((1, 4, 4, 3)), jnp.zeros((5, 5, 3, 4)))


def lax_arguments(channels=128, **changes):
    x = jnp.zeros((1, 8, 8, channels))
    w = jnp.zeros((3, 3, channels, 8))
    args = dict(
        lhs=x,
        rhs=w,
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        lhs_dilation=(1, 1),
        rhs_dilation=(1, 1),
        dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape, winograd.NHWC),
        feature_group_count=1,
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, applies",
    [
        ({}, True),
        ({"dimension_numbers": winograd.NHWC}, True),
        ({"window_strides": (2, 2)}, False),
        ({"padding": ((0, 0), (0, 0))}, False),
        ({"padding": "SAME"}, False),
        ({"rhs_dilation": (2, 2)}, False),
        ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, False),
        ({"lhs": jnp.zeros((1, 8, 8, 128), jnp.bfloat16)}, False),
        ({"lhs": jnp.zeros((1, 8, 8, 32)), "rhs": jnp.zeros((3, 3, 32, 8))}, False),
        ({"lhs": jnp.zeros((1, 7, 9, 128))}, False),
        ({"rhs": jnp.zeros((1, 1, 128, 8))}, False),
    ],
)
def test_winograd_takes_only_the_convolutions_it_computes(changes, applies):
    """3x3, stride 1, padding 1, NHWC float32 with at least MIN_CHANNELS inputs on a map of at
    least MIN_SIZE a side; everything else goes to lax unchanged."""
    assert winograd.applies(**lax_arguments(**changes)) is applies


def test_a_1d_convolution_goes_to_lax():
    """flax's nn.Conv with a 1-D kernel hands the drop-in 3-D operands."""
    x = jnp.ones((2, 9, 128))
    w = jnp.ones((3, 128, 4))
    spec = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHC", "HIO", "NHC"))
    args = dict(lhs_dilation=(1,), rhs_dilation=(1,), dimension_numbers=spec)
    assert not winograd.applies(x, w, (1,), ((1, 1),), feature_group_count=1, **args)
    got = winograd.conv_general_dilated(x, w, (1,), ((1, 1),), **args)
    assert got.shape == (2, 9, 4)


def test_the_drop_in_falls_back_to_lax_exactly():
    """A stride-2 convolution through the drop-in is lax's, bit for bit."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 8, 8, 128)).astype(np.float32)
    w = rng.normal(size=(3, 3, 128, 4)).astype(np.float32)
    spec = jax.lax.conv_dimension_numbers(x.shape, w.shape, winograd.NHWC)
    got = winograd.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=spec)
    want = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=spec)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_iresnet_evaluation_with_winograd_equals_direct_and_training_is_direct():
    """An IResNet-18 whose 3x3 stride-1 convolutions on maps of 8+ pixels go through Winograd in
    evaluation:
    its embeddings equal the direct convolution's to 1e-5 of their scale, and the training
    forward (batch statistics) is the direct one bit for bit."""
    fast = IResNet(depth=18, embed_dim=16, image_size=32, conv_algorithm="winograd")
    direct = fast.clone(conv_algorithm="direct")
    images = jax.random.uniform(jax.random.PRNGKey(0), (3, 32, 32, 3), minval=-1, maxval=1)
    variables = jax.jit(lambda: direct.init(jax.random.PRNGKey(1), images))()
    emb_fast = np.asarray(jax.jit(lambda v: fast.apply(v, images)[0])(variables))
    emb_direct = np.asarray(jax.jit(lambda v: direct.apply(v, images)[0])(variables))
    assert np.abs(emb_fast - emb_direct).max() < 1e-5 * np.abs(emb_direct).max()
    assert not np.array_equal(emb_fast, emb_direct)  # the Winograd path did run

    def train_forward(model):
        out, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return out[0]

    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda: train_forward(fast))()),
        np.asarray(jax.jit(lambda: train_forward(direct))()),
    )


def test_an_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="conv_algorithm='fft' is not one of"):
        inference_conv("fft", train=False)
