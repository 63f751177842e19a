"""Expert routing maps: which expert each patch position goes to, on average over faces.

The FaceMoE paper claims its experts specialise by facial region. Aligned faces put the eyes,
nose and mouth at fixed patch positions, so the claim is visible in one statistic per MoE layer:
for every token position s and expert e, the share of faces whose router ranks e first at s.
A layer whose map shows large uniform regions (eyes -> expert 2, mouth -> expert 0) has
specialised experts; a map where every position sends ~1/E of the faces to each expert has not.

The router logits come from `TopKRouter`'s ``sow("intermediates", "router_logits", ...)``,
collected with ``model.apply(..., mutable=["intermediates"])``; the forward pass is otherwise the
evaluation one (no flip, train=False). Positions are the ViT's token grid, row-major,
(image_size // patch_size)^2 tokens, no class token; a layer whose token count is not a square
cannot be drawn on the face and is skipped by the picture.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from facemoe_jax.core.images import normalize_images
from facemoe_jax.data.pipeline import eval_batches


def _natural_key(name: str) -> tuple:
    """Sort key in which numbers inside names compare as numbers (blocks_2 before blocks_10)."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name) if t)


def _module_name(path) -> str:
    keys = [str(getattr(p, "key", p)) for p in path]
    return "/".join(k for k in keys if k not in ("router_logits",) and not k.startswith("["))


def make_router_logits_fn(model):
    """jit(variables, uint8 images) -> {MoE router module path: (B, S, E) float32 logits}."""

    @jax.jit
    def router_logits(variables, images):
        _, state = model.apply(
            variables, normalize_images(images), train=False, mutable=["intermediates"]
        )
        leaves = jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]
        return {
            _module_name(path): value
            for path, value in leaves
            if "router_logits" in jax.tree_util.keystr(path)
        }

    return router_logits


def collect_router_logits(
    model, variables, images: np.ndarray, batch_size: int
) -> dict[str, np.ndarray]:
    """{router path, in layer order: (N, S, E) logits} for `images` (N, H, W, 3) uint8."""
    from facemoe_jax.evaluate.embed import EmbedFn

    fn = EmbedFn(make_router_logits_fn(model))  # compiled ahead, batch capped to free memory
    batch_size = fn.fit_batch_size(variables, images.shape[1:], min(batch_size, len(images)))
    per_layer: dict[str, list[np.ndarray]] = {}
    for batch, valid in eval_batches(images, batch_size):
        for name, logits in fn(variables, batch).items():
            per_layer.setdefault(name, []).append(np.asarray(logits)[:valid])
    return {name: np.concatenate(per_layer[name]) for name in sorted(per_layer, key=_natural_key)}


def first_choice_shares(logits: np.ndarray) -> np.ndarray:
    """(N, S, E) logits -> (S, E): share of the N faces whose top-ranked expert at s is e.

    Ties go to the lower expert index, as `jax.lax.top_k` breaks them.
    """
    logits = np.asarray(logits)
    num_experts = logits.shape[-1]
    first = np.argmax(logits, axis=-1)  # (N, S)
    return np.eye(num_experts)[first].mean(axis=0)


def routing_summary(shares: np.ndarray) -> dict[str, float]:
    """How specialised a layer is, from its (S, E) shares.

    positional_purity: mean over positions of the largest share (1/E = every face routed
    differently, 1 = the position always goes to the same expert); experts_used: how many
    experts are the majority choice somewhere.
    """
    return {
        "positional_purity": float(np.mean(np.max(shares, axis=1))),
        "experts_used": float(len(np.unique(np.argmax(shares, axis=1)))),
    }
