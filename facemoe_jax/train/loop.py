"""The train loop: set up, compile the step ahead of time, train, checkpoint, evaluate.

Sections, in order: (1) validate the config and build model, mesh, optimiser and data; (2) create
or restore the state; (3) lower and compile the jitted step once, logging compile seconds and
FLOPs per step; (4) the step loop with progress, metrics and checkpoints; (5) final evaluation of
every set in config.eval (evaluate/suite.py), written to workdir/eval/ with its pictures.
"""

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from clu import periodic_actions

from facemoe_jax.data import augment as augment_lib
from facemoe_jax.data import pipeline, sources
from facemoe_jax.evaluate import suite as eval_suite
from facemoe_jax.models import build_model
from facemoe_jax.parallel import mesh as mesh_lib
from facemoe_jax.parallel import sharding
from facemoe_jax.train import checkpoint as checkpoint_lib
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from facemoe_jax.train import step as step_lib
from facemoe_jax.train import trainable as trainable_lib
from facemoe_jax.train.writers import make_writer


def check_workdir(workdir: str, wait_s: float = 120.0) -> None:
    """Process 0 creates the workdir and proves it writable; the other processes of the run
    only wait (up to wait_s) until it exists and can be written, so they never race on the
    same probe file. Every process must see the same folder (a shared disk or a bucket)."""
    if jax.process_index() != 0:
        deadline = time.monotonic() + wait_s
        while not os.path.isdir(workdir):
            if time.monotonic() > deadline:
                raise ValueError(
                    f"--workdir={workdir} did not appear within {wait_s:.0f} s on process "
                    f"{jax.process_index()}: process 0 creates it, and every process must see "
                    "the same folder (a shared disk or a bucket)"
                )
            time.sleep(0.05)
        if not os.access(workdir, os.W_OK | os.X_OK):
            raise ValueError(
                f"--workdir={workdir} is not writable by process {jax.process_index()}"
            )
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--workdir={workdir} is not writable: {e.strerror}") from None


def flops_per_step(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def print_trainable_share(params, config) -> None:
    """One line saying what trains, when not everything does."""
    patterns = config.train.get("trainable", trainable_lib.ALL)
    if trainable_lib.trains_everything(patterns):
        return
    mask = trainable_lib.trainable_mask(params, patterns)
    trained, total = trainable_lib.trainable_count(params, mask)
    enc_trained, enc_total = trainable_lib.trainable_count(params["encoder"], mask["encoder"])
    update = "updated" if config.train.get("update_batch_stats", False) else "kept"
    print(
        f"trainable: {trained / 1e6:.3f}M of {total / 1e6:.3f}M parameters "
        f"({100 * trained / total:.2f} %; encoder {enc_trained / 1e6:.3f}M of "
        f"{enc_total / 1e6:.3f}M = {100 * enc_trained / max(enc_total, 1):.2f} %) matching "
        f"{list(trainable_lib.parse_patterns(patterns))}; frozen BatchNorm statistics {update}",
        flush=True,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # ---- (1) Set-up: every check that can fail runs before anything expensive.
    check_workdir(workdir)
    num_steps = config.train.num_steps
    if num_steps < 1:
        raise ValueError(f"config.train.num_steps={num_steps} must be >= 1")
    model = build_model(config.model)
    step_lib.check_loss_config(config.loss)
    eval_suite.check_eval_config(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_size(config.train.batch_size, mesh)
    sharding.check_config(config, mesh)
    optimizer, schedule = optimizer_lib.build_optimizer(
        config.optimizer, num_steps, config.train.get("trainable")
    )
    source = sources.train_source(config)
    data_iter = pipeline.train_iterator(
        source,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        augment=augment_lib.Augmenter(config.data),
        image_size=config.model.image_size,
        worker_count=config.data.worker_count,
        max_bad_share=config.data.max_bad_share,
    )
    writer = make_writer(workdir)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep
    )

    # ---- (2) State: restored into the current mesh's shardings, or created there.
    abstract_state = state_lib.abstract_train_state(model, optimizer, config)
    state_shardings = sharding.state_shardings(abstract_state, mesh, config.sharding_rules)
    latest = checkpointer.latest_step()
    if latest is not None:
        target = checkpoint_lib.with_shardings(abstract_state, state_shardings)
        state = checkpointer.restore(latest, target, data_iter)
        logging.info("Resumed from step %d in %s", latest, workdir)
        print(f"resumed from checkpoint at step {latest}", flush=True)
    else:
        with jax.set_mesh(mesh):  # arrays are created in their shards, never whole
            state = state_lib.create_train_state(model, optimizer, config, state_shardings)
        if config.get("init_from"):
            from facemoe_jax.train.init_from import initialize_from

            state = initialize_from(state, config)
    encoder_params = state_lib.count_params(state.params["encoder"])
    centres = state_lib.count_class_centre_params(state.params, config)
    print(
        f"model: {encoder_params / 1e6:.2f}M encoder parameters, {centres / 1e6:.2f}M class-centre "
        f"parameters; mesh {dict(mesh.shape)}; data {source!r}",
        flush=True,
    )
    print_trainable_share(state.params, config)

    # ---- (3) Compile the step once, ahead of the loop.
    size = config.model.image_size
    batch_spec = {
        "image": jax.ShapeDtypeStruct(
            (config.train.batch_size, size, size, 3),
            jnp.uint8,
            sharding=mesh_lib.batch_sharding(mesh),
        ),
        "label": jax.ShapeDtypeStruct(
            (config.train.batch_size,), jnp.int32, sharding=mesh_lib.batch_sharding(mesh)
        ),
    }
    train_step = jax.jit(
        step_lib.make_train_step(model, config, optimizer, schedule),
        donate_argnums=0,
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
    )
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # traced under the mesh: expert-parallel MoE, sharded classifier
        compiled = train_step.lower(state, batch_spec).compile()
    compile_seconds = time.perf_counter() - t0
    flops = flops_per_step(compiled)
    print(
        f"compiled train step in {compile_seconds:.1f} s; "
        f"{(flops or 0) / 1e9:.2f} GFLOP per step (XLA cost analysis)",
        flush=True,
    )

    # ---- (4) Train.
    start = int(state.step)
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer, every_secs=30.0
    )
    sums, count, interval_start = None, 0, time.perf_counter()
    for step in range(start + 1, num_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = mesh_lib.global_batch(next(data_iter), mesh)
            state, metrics = compiled(state, batch)
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count += 1
        report_progress(step)
        if step % config.train.log_every_steps == 0 or step == num_steps:
            means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
            seconds = time.perf_counter() - interval_start
            means["train/steps_per_sec"] = count / seconds
            means["train/img_per_sec"] = count * config.train.batch_size / seconds
            means["train/img_per_sec_per_device"] = means["train/img_per_sec"] / jax.device_count()
            means["data/skipped_records"] = data_iter.skipped_records  # this host, cumulative
            if flops:
                means["train/gflops_per_sec"] = flops * count / seconds / 1e9
            writer.write_scalars(step, means)
            eta = (num_steps - step) / means["train/steps_per_sec"]
            print(
                f"step {step:>6}/{num_steps}: loss {means['train/loss']:.4f} "
                f"acc {means['train/accuracy'] * 100:5.1f} % lr {means['train/lr']:.2e} "
                f"{means['train/steps_per_sec']:.2f} steps/s {means['train/img_per_sec']:.0f} "
                f"img/s ETA {int(eta) // 60}m{int(eta) % 60:02d}s",
                flush=True,
            )
            sums, count, interval_start = None, 0, time.perf_counter()
        if checkpointer.should_save(step) or step == num_steps:
            checkpointer.save(step, state, data_iter, config)
        if eval_suite.is_periodic_eval_step(config, step, num_steps):
            variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
            eval_suite.run_evaluations(model, variables, config, workdir, step, writer)
    checkpointer.wait()

    # ---- (5) Evaluate the final model: every set in config.eval (evaluate/suite.py).
    variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    results = eval_suite.run_evaluations(model, variables, config, workdir, num_steps, writer)
    writer.flush()
    checkpointer.close()
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """--mode=eval: every evaluation in config.eval, on the latest checkpoint in workdir."""
    model = build_model(config.model)
    eval_suite.check_eval_config(config)
    optimizer, _ = optimizer_lib.build_optimizer(
        config.optimizer, config.train.num_steps, config.train.get("trainable")
    )
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep
    )
    step = checkpointer.latest_step()
    if step is None:
        raise ValueError(f"--workdir={workdir} holds no checkpoint to evaluate")
    mesh = mesh_lib.make_mesh(config.mesh)
    abstract_state = state_lib.abstract_train_state(model, optimizer, config)
    shardings = sharding.state_shardings(abstract_state, mesh, config.sharding_rules)
    state = checkpointer.restore(step, checkpoint_lib.with_shardings(abstract_state, shardings))
    checkpointer.close()
    variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    writer = make_writer(workdir)
    results = eval_suite.run_evaluations(model, variables, config, workdir, step, writer)
    writer.flush()
    return results
