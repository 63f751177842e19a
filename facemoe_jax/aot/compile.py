"""The config's train step and embedding step, compiled for a mesh of (described) devices."""

from __future__ import annotations

from facemoe_jax.aot.topology import AotError


def abstract_sharded_state(config, mesh):
    """(model, optimizer, schedule, state of sharded ShapeDtypeStructs, their shardings)."""
    import jax

    from facemoe_jax.models import build_model
    from facemoe_jax.parallel import sharding
    from facemoe_jax.train import optimizer as optimizer_lib
    from facemoe_jax.train import state as state_lib

    model = build_model(config.model)
    optimizer, schedule = optimizer_lib.build_optimizer(
        config.optimizer, config.train.num_steps, config.train.trainable
    )
    abstract = state_lib.abstract_train_state(model, optimizer, config)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return model, optimizer, schedule, state, shardings


def _no_frozen_inputs(path, *args, **kwargs):
    raise AotError(
        f"an objective of this config loads {path!r} (a teacher): the AOT report compiles "
        "configs without frozen inputs; leave the distillation out (--config.distill.teacher=)"
    )


def compile_train_step(config, mesh, batch_size: int = 0):
    """(the compiled train step, the abstract state, the model) of `config` on `mesh`, for a
    global batch of `batch_size` (0: config.train.batch_size)."""
    import jax
    import jax.numpy as jnp

    from facemoe_jax.parallel import mesh as mesh_lib
    from facemoe_jax.train import objectives as objectives_lib
    from facemoe_jax.train import step as step_lib

    model, optimizer, schedule, state, shardings = abstract_sharded_state(config, mesh)
    resources = objectives_lib.Resources(mesh=mesh, load_variables=_no_frozen_inputs)
    objectives = objectives_lib.build(config, resources)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    size, batch = config.model.image_size, batch_size or config.train.batch_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=batch_sharding)
    spec = {
        "image": images,
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding),
    }
    for key in objectives_lib.batch_keys(objectives):
        if key != "image_hr":
            raise AotError(f"an objective needs the batch entry {key!r}, unknown to the AOT report")
        spec[key] = images
    step = jax.jit(
        step_lib.make_train_step(model, config, optimizer, schedule, objectives),
        donate_argnums=0,
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
    )
    with jax.set_mesh(mesh):
        return step.lower(state, spec, {}).compile(), state, model


def compile_embed_step(config, mesh, model, state, batch_size: int):
    """The compiled embedding step (evaluation's: flip test as config.eval.flip_test) on a
    batch of `batch_size` uint8 images split over the mesh."""
    import jax
    import jax.numpy as jnp

    from facemoe_jax.evaluate import embed
    from facemoe_jax.parallel import mesh as mesh_lib

    variables = {"params": state.params["encoder"]}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    size = config.model.image_size
    images = jax.ShapeDtypeStruct(
        (batch_size, size, size, 3), jnp.uint8, sharding=mesh_lib.batch_sharding(mesh)
    )
    jitted = embed.make_embed_fn(model, flip_test=config.eval.flip_test).jitted
    with jax.set_mesh(mesh):
        return jitted.lower(variables, images).compile()
