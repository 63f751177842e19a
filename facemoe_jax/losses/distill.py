"""Instance- and relation-level distillation losses (adaptable instance-relation distillation).

An HR teacher's embeddings `t` (B, Dt) guide an LR student's `s` (B, Ds) of the same images:

  instance  "cosine": mean_i (1 - cos(s_i, t_i))
            "mse":    mean_i ||s_i/|s_i| - t_i/|t_i|||^2 / D   (MSE of the L2-normalised rows;
                      equals 2 (1 - cos) / D, so it is the cosine form scaled down by D / 2)
  relation  "mse":    mean_ij (cos(s_i, s_j) - cos(t_i, t_j))^2  over all B^2 pairs (the
                      diagonal is 1 - 1 = 0 on both sides)
            "kl":     mean_i KL(softmax_j(cos(t_i, t_j) / tau) || softmax_j(cos(s_i, s_j) / tau))
                      * tau^2, the diagonal left out (a row's own similarity, always 1, would
                      dominate its softmax); the relational-KD form, scaled by tau^2 as Hinton's
                      KD so the gradient size does not depend on tau.

The relation loss compares B x B similarity matrices, so it needs the *global* batch. These are
plain functions of global arrays: under `jit` with the batch sharded over the mesh's data axes
XLA gathers what the matrix product needs, and the value is the single-device one (tested on
8 devices). All arithmetic is float32 whatever the activation dtype.

These forms are our reading of the abstract of arXiv 2409.02049 (Shi, Guo, Ge) and of the
issue; the paper's exact formulas were not available and no official code exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from facemoe_jax.losses.classifier import l2_normalize

INSTANCE_FORMS = ("cosine", "mse")
RELATION_FORMS = ("mse", "kl")


def cosine_matrix(x: jax.Array) -> jax.Array:
    """(B, D) -> (B, B) cosines between every pair of rows."""
    unit = l2_normalize(x)
    return unit @ unit.T


def instance_loss(student: jax.Array, teacher: jax.Array, form: str = "cosine") -> jax.Array:
    """Mean over the batch of the per-image distance between student and teacher embeddings."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"instance distillation needs embeddings of one size: student {student.shape}, "
            f"teacher {teacher.shape} (config.model.embed_dim of both)"
        )
    s, t = l2_normalize(student), l2_normalize(teacher)
    if form == "cosine":
        return jnp.mean(1.0 - jnp.sum(s * t, axis=-1))
    if form == "mse":
        return jnp.mean(jnp.square(s - t))
    raise ValueError(f"config.distill.instance_form={form!r} is not one of {INSTANCE_FORMS}")


def relation_loss(
    student: jax.Array, teacher: jax.Array, form: str = "mse", temperature: float = 0.1
) -> jax.Array:
    """The student's batch similarity structure against the teacher's (any embedding sizes)."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"relation distillation: {student.shape[0]} student rows but "
            f"{teacher.shape[0]} teacher rows"
        )
    cos_s, cos_t = cosine_matrix(student), cosine_matrix(teacher)
    if form == "mse":
        return jnp.mean(jnp.square(cos_s - cos_t))
    if form == "kl":
        if not temperature > 0:
            raise ValueError(f"config.distill.temperature={temperature} must be > 0")
        off_diagonal = ~jnp.eye(cos_s.shape[0], dtype=bool)
        log_p_s = _masked_log_softmax(cos_s / temperature, off_diagonal)
        log_p_t = _masked_log_softmax(cos_t / temperature, off_diagonal)
        kl = jnp.sum(jnp.where(off_diagonal, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0), axis=1)
        return jnp.mean(kl) * temperature**2
    raise ValueError(f"config.distill.relation_form={form!r} is not one of {RELATION_FORMS}")


def _masked_log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    # A large finite value, not -inf: the gradient through jnp.where stays finite.
    logits = jnp.where(mask, logits, -1e9)
    return jnp.where(mask, jax.nn.log_softmax(logits, axis=-1), 0.0)
