"""models/layers.PatchEmbed against a strided VALID convolution with the same parameters."""

import jax
import numpy as np
import torch

from facemoe_jax.models.layers import PatchEmbed


def test_patch_embed_equals_torch_conv_including_an_uncovered_border():
    # 112 px with 9 px patches leaves 4 px that a VALID convolution never reads (ViT-B/9).
    images = np.random.default_rng(0).standard_normal((2, 112, 112, 3)).astype(np.float32)
    module = PatchEmbed(features=16, patch_size=9)
    variables = module.init(jax.random.PRNGKey(0), images)
    params = variables["params"]
    assert params["kernel"].shape == (9, 9, 3, 16) and params["bias"].shape == (16,)
    params = {"kernel": params["kernel"], "bias": params["bias"] + 0.1}
    ours = np.asarray(module.apply({"params": params}, images))

    conv = torch.nn.Conv2d(3, 16, 9, stride=9)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.array(params["kernel"]).transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        reference = conv(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert ours.shape == (2, 12, 12, 16)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_add_position_embedding_value_and_gradients_match_numpy():
    from facemoe_jax.models.layers import add_position_embedding

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    pos = rng.standard_normal((1, 5, 4)).astype(np.float32)
    weight = rng.standard_normal((3, 5, 4)).astype(np.float32)

    def loss(x, pos):
        return jax.numpy.sum(weight * add_position_embedding(x, pos) ** 2)

    value, (gx, gpos) = jax.value_and_grad(loss, argnums=(0, 1))(x, pos)
    total = x.astype(np.float64) + pos
    np.testing.assert_allclose(value, np.sum(weight * total**2), rtol=1e-5)
    np.testing.assert_allclose(gx, 2 * weight * total, rtol=1e-5, atol=1e-6)
    # d/dpos sums the per-image gradients over the batch
    np.testing.assert_allclose(gpos, np.sum(2 * weight * total, 0, keepdims=True), rtol=1e-5)
    assert gpos.shape == pos.shape and gpos.dtype == np.float32

    # bfloat16 activations, float32 parameter: the sum is bfloat16, the gradient float32
    xb = jax.numpy.asarray(x, jax.numpy.bfloat16)
    assert add_position_embedding(xb, pos).dtype == jax.numpy.bfloat16
    g = jax.grad(lambda p: jax.numpy.sum(add_position_embedding(xb, p).astype(np.float32)))(pos)
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, np.full(pos.shape, 3.0))
