"""The train loop: set up, compile the step ahead of time, run it with the hooks, evaluate.

Sections, in order: (1) validate the config and build model, mesh, optimiser, data and the
active objectives (train/objectives/); (2) create or restore the state; (3) lower and compile the
jitted step once, logging compile seconds and FLOPs per step; (4) the step loop, whose body is
hooks (train/hooks.py: preemption, bad-step guard, logging, checkpoints, periodic evaluation);
(5) the final evaluation.

What the loop needs from the layers above train/ (the one weight loader, the evaluations) comes
in as `Services` (pipelines.py builds them); train/ imports nothing above itself.
"""

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from facemoe_jax.core import huge_pages, messages, paths
from facemoe_jax.data import augment as augment_lib
from facemoe_jax.data import pipeline, sources
from facemoe_jax.models import build_model, registry
from facemoe_jax.parallel import mesh as mesh_lib
from facemoe_jax.parallel import sharding
from facemoe_jax.train import checkpoint as checkpoint_lib
from facemoe_jax.train import hooks as hooks_lib
from facemoe_jax.train import mfu as mfu_lib
from facemoe_jax.train import objectives as objectives_lib
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from facemoe_jax.train import step as step_lib
from facemoe_jax.train import trainable as trainable_lib
from facemoe_jax.train.writers import make_writer


@dataclasses.dataclass(frozen=True)
class Services:
    """The loop's uses of the layers above train/, passed in (pipelines.default_services)."""

    # path, config=None, *, field=..., ... -> Loaded(origin, config, variables, class_centers,
    # step): interop/load.py, for config.init_from and frozen inputs such as a teacher.
    load_variables: Callable | None = None
    # evaluate/suite.py: check_eval_config(config), is_periodic_eval_step(config, step, n),
    # run_evaluations(model, variables, config, workdir, step, writer, outputs) -> dict.
    evaluations: Any = None


def check_workdir(workdir: str, wait_s: float = 120.0) -> None:
    """Process 0 creates the workdir and proves it writable; the other processes of the run
    only wait (up to wait_s) until it exists and can be written, so they never race on the
    same probe file. Every process must see the same folder (a shared disk or a bucket).

    A URL (gs://bucket/run) goes through epath like every file of the run: no local folder is
    created from it, and an unreachable bucket stops the run in one line naming it."""
    path = paths.workdir_path(workdir)
    remote = paths.is_remote(workdir)
    if remote:
        paths.import_tensorflow_quietly()  # epath's gs:// backend; keep its notices quiet
    if jax.process_index() != 0:
        deadline = time.monotonic() + wait_s
        while not _is_dir(path, workdir):
            if time.monotonic() > deadline:
                raise ValueError(
                    f"--workdir={workdir} did not appear within {wait_s:.0f} s on process "
                    f"{jax.process_index()}: process 0 creates it, and every process must see "
                    "the same folder (a shared disk or a bucket)"
                )
            time.sleep(0.05)
        if not remote and not os.access(os.fspath(path), os.W_OK | os.X_OK):
            raise ValueError(
                f"--workdir={workdir} is not writable by process {jax.process_index()}"
            )
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        with probe.open("w") as f:
            f.write("ok")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - OSError locally; remote backends raise their own
        if remote:
            raise ValueError(
                f"--workdir={workdir}: cannot write to the bucket "
                f"{paths.bucket_of(workdir)} ({_short(e)})"
            ) from None
        if not isinstance(e, OSError):
            raise
        raise ValueError(f"--workdir={workdir} is not writable: {e.strerror or e}") from None


def _is_dir(path, workdir: str) -> bool:
    try:
        return path.is_dir()
    except Exception as e:  # noqa: BLE001 - a remote backend that cannot be reached
        raise ValueError(
            f"--workdir={workdir}: cannot reach {paths.bucket_of(workdir)} ({_short(e)})"
        ) from None


def _short(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_evaluations(
    evaluations, model, variables, config, workdir: str, step: int, writer, outputs="eval"
) -> dict:
    """The evaluations' results, their files in workdir/`outputs` ({} without evaluations).
    evaluate/ writes with local file calls, so for a URL workdir it writes into a local
    temporary folder that is then copied to the URL through epath (never a local folder named
    after the URL)."""
    if evaluations is None:
        return {}
    run = evaluations.run_evaluations
    if not paths.is_remote(workdir):
        return run(model, variables, config, workdir, step, writer, outputs)
    with tempfile.TemporaryDirectory(prefix="facemoe_eval_") as local:
        results = run(model, variables, config, local, step, writer, outputs)
        if jax.process_index() == 0:
            paths.copy_tree(local, paths.workdir_path(workdir))
    return results


def flops_per_step(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def print_trainable_share(params, config) -> None:
    """One line saying what trains, when not everything does."""
    patterns = config.train.trainable
    if trainable_lib.trains_everything(patterns):
        return
    mask = trainable_lib.trainable_mask(params, patterns)
    trained, total = trainable_lib.trainable_count(params, mask)
    enc_trained, enc_total = trainable_lib.trainable_count(params["encoder"], mask["encoder"])
    update = "updated" if config.train.update_batch_stats else "kept"
    print(
        f"trainable: {trained / 1e6:.3f}M of {total / 1e6:.3f}M parameters "
        f"({100 * trained / total:.2f} %; encoder {enc_trained / 1e6:.3f}M of "
        f"{enc_total / 1e6:.3f}M = {100 * enc_trained / max(enc_total, 1):.2f} %) matching "
        f"{list(trainable_lib.parse_patterns(patterns))}; frozen BatchNorm statistics {update}",
        flush=True,
    )
    pretrained = config.init_from or registry.spec(config.model.name).carries_weights
    if enc_trained < enc_total and not pretrained:
        messages.warning(
            "part of the encoder is frozen but config.init_from is empty: the frozen "
            "weights are random (start from a pre-trained run: --config.init_from=WORKDIR)"
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    services: Services = Services(),
    extra_hooks: tuple = (),
) -> dict:
    """Trains config's model in workdir (continuing from its latest checkpoint), then runs the
    evaluations; returns their results. extra_hooks run first after every step."""
    # ---- (1) Set-up: every check that can fail runs before anything is written.
    num_steps = config.train.num_steps
    if num_steps < 1:
        raise ValueError(f"config.train.num_steps={num_steps} must be >= 1")
    max_bad_steps = int(config.train.max_bad_steps)
    if max_bad_steps < 1:
        raise ValueError(f"config.train.max_bad_steps={max_bad_steps} must be >= 1")
    model = build_model(config.model)
    objectives_lib.check_config(config)
    evaluations = services.evaluations
    if evaluations is not None:
        evaluations.check_eval_config(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_size(config.train.batch_size, mesh)
    sharding.check_config(config, mesh)
    optimizer, schedule = optimizer_lib.build_optimizer(
        config.optimizer, num_steps, config.train.trainable
    )
    # The data before the state's shapes: config.data.num_classes=0 takes the data's count.
    source = sources.train_source(config)
    config = sources.with_data_counts(config, source)
    # The state's shapes: building them checks config.train.trainable against the parameters,
    # like every mistake here, before anything is written into the workdir.
    abstract_state = state_lib.abstract_train_state(model, optimizer, config)
    if config.init_from and not os.path.exists(str(config.init_from)):
        raise ValueError(f"config.init_from={config.init_from!r} does not exist")
    _check_centre_init(config)
    sources.check_images(source, config)  # image folders: every file decodes, before compiling
    # The active objectives, with their frozen inputs (a teacher: reloaded at every start, never
    # saved).
    resources = objectives_lib.Resources(
        mesh=mesh, load_variables=services.load_variables, source=source
    )
    objectives = objectives_lib.build(config, resources)
    for objective in objectives:
        line = objective.describe()
        if line:
            print(line, flush=True)
    frozen = objectives_lib.frozen_inputs(objectives)
    extra_keys = objectives_lib.batch_keys(objectives)
    unknown = set(extra_keys) - {"image_hr", "record"}
    if unknown:
        raise ValueError(f"objectives need batch entries the pipeline cannot give: {unknown}")
    # Paired batches ("image_hr": the geometry-only images) for a teacher or the quality copies;
    # "record": each image's source index, for per-record tables (cached teacher embeddings).
    paired = "image_hr" in extra_keys
    check_workdir(workdir)
    data_iter = pipeline.train_iterator(
        source,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        augment=augment_lib.Augmenter(config.data, paired=paired),
        image_size=config.model.image_size,
        worker_count=config.data.worker_count,
        max_bad_share=config.data.max_bad_share,
        record_index="record" in extra_keys,
    )
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep
    )

    # ---- (2) State: restored into the current mesh's shardings, or created there. The saved
    # config is checked first (another architecture or data is refused); unreadable steps are
    # skipped with a warning.
    # From here a SIGTERM/SIGINT is held until the first step is done, then saved (section 4).
    watch = hooks_lib.PreemptionWatch()
    state_shardings = sharding.state_shardings(abstract_state, mesh, config.sharding_rules)
    target = checkpoint_lib.with_shardings(abstract_state, state_shardings)
    restored = checkpointer.restore_latest(target, data_iter, config)
    loop_state = {"skipped_steps": 0, "bad_streak": 0}
    if restored is not None:
        state, latest, saved_loop = restored
        loop_state.update(saved_loop)
        logging.info("Resumed from step %d in %s", latest, workdir)
        print(f"resumed from checkpoint at step {latest}", flush=True)
    else:
        with jax.set_mesh(mesh):  # arrays are created in their shards, never whole
            state = state_lib.create_train_state(model, optimizer, config, state_shardings)
        if config.init_from:
            from facemoe_jax.train.init_from import initialize_from

            state = initialize_from(state, config, services.load_variables)
        if config.loss.centre_init == "imprint":
            from facemoe_jax.train.imprint import imprint_centres

            with jax.set_mesh(mesh):
                state = imprint_centres(state, model, source, config)
    start = int(state.step)
    writer = make_writer(workdir, resume_step=start)
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
    batch_sharding = mesh_lib.batch_sharding(mesh)
    images = jax.ShapeDtypeStruct(
        (config.train.batch_size, size, size, 3), jnp.uint8, sharding=batch_sharding
    )
    batch_spec = {
        "image": images,
        "label": jax.ShapeDtypeStruct(
            (config.train.batch_size,), jnp.int32, sharding=batch_sharding
        ),
    }
    if paired:
        batch_spec["image_hr"] = images
    if "record" in extra_keys:
        batch_spec["record"] = batch_spec["label"]
    train_step = jax.jit(
        step_lib.make_train_step(model, config, optimizer, schedule, objectives),
        donate_argnums=0,
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
    )
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # traced under the mesh: expert-parallel MoE, sharded classifier
        compiled = train_step.lower(state, batch_spec, frozen).compile()
    compile_seconds = time.perf_counter() - t0
    flops = mfu_lib.flops_per_device(compiled)  # per device: the step is SPMD-partitioned
    peak, peak_source = mfu_lib.peak_flops_per_device()
    print(
        f"compiled train step in {compile_seconds:.1f} s; "
        f"{(flops or 0) / 1e9:.2f} GFLOP per step per device (XLA cost analysis, "
        f"{jax.device_count()} device(s); loop bodies counted once); peak "
        f"{peak / 1e12:.2f} TFLOP/s per device ({peak_source})"
        + (f"; {huge_pages.summary()}" if jax.default_backend() == "cpu" else ""),
        flush=True,
    )

    # ---- (4) Train: after each step the hooks run in order (train/hooks.py).
    def evaluate(variables, step):
        return run_evaluations(evaluations, model, variables, config, workdir, step, writer)

    run = hooks_lib.LoopRun(
        config=config,
        num_steps=num_steps,
        writer=writer,
        checkpointer=checkpointer,
        data_iter=data_iter,
        loop_state=loop_state,
        flops=flops,
        peak=peak,
    )
    is_due = (
        (lambda step: evaluations.is_periodic_eval_step(config, step, num_steps))
        if evaluations is not None
        else (lambda step: False)
    )
    hooks = [
        *extra_hooks,
        watch,
        hooks_lib.BadStepGuard(max_bad_steps),
        hooks_lib.MetricsLogger(),
        hooks_lib.CheckpointHook(watch, max_bad_steps),
        hooks_lib.PeriodicEvaluation(is_due, evaluate),
    ]
    try:
        for step in range(start + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = mesh_lib.global_batch(next(data_iter), mesh)
                state, metrics = compiled(state, batch, frozen)
            run.step, run.state, run.metrics = step, state, metrics
            for hook in hooks:
                hook.after_step(run)
        checkpointer.wait()
    finally:
        watch.restore()
    _print_save_times(checkpointer)

    # ---- (5) Evaluate the final model.
    results = evaluate(
        {"params": state.params["encoder"], "batch_stats": state.batch_stats}, num_steps
    )
    writer.flush()
    checkpointer.close()
    return results


def _check_centre_init(config) -> None:
    mode = config.loss.centre_init
    if mode not in ("random", "imprint"):
        raise ValueError(f"config.loss.centre_init={mode!r} is not 'random' or 'imprint'")
    if mode == "imprint" and config.init_classifier:
        raise ValueError(
            "config.loss.centre_init='imprint' and config.init_classifier both set the class "
            "centres: choose one"
        )
    if mode == "imprint" and int(config.loss.imprint_images_per_class) < 1:
        raise ValueError(
            f"config.loss.imprint_images_per_class={config.loss.imprint_images_per_class} "
            f"must be >= 1"
        )


def _print_save_times(checkpointer) -> None:
    """One line: how long saving blocked the loop and how long until it was committed (seen
    at the next step's poll, so to within one step)."""
    times = checkpointer.save_seconds
    if not times:
        return
    blocking = sum(t[1] for t in times) / len(times)
    total = sum(t[2] for t in times) / len(times)
    logging.info(
        "checkpoint saves: %d, blocking %.3f s, committed after %.3f s (mean)",
        len(times),
        blocking,
        total,
    )
    if os.environ.get("FACEMOE_PRINT_SAVE_TIMES"):
        print(
            f"checkpoint saves: {len(times)}; the loop blocked {blocking:.3f} s per save, "
            f"committed after {total:.3f} s (mean)",
            flush=True,
        )


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, services: Services = Services()
) -> dict:
    """--mode=eval: every evaluation in config.eval, on the latest checkpoint in workdir.

    The model, data and seed are the checkpoint's own (saved beside it; the command line's are
    not asked for, and a difference is named in one line); config.eval, the mesh and the
    sharding rules are the command line's (checkpoint_lib.evaluation_config). The files go to
    workdir/eval/step<N>_eval/ (results.json, the pictures, metrics.jsonl and TensorBoard
    events of this evaluation): the training run's eval/results.json and metrics.jsonl are
    left as training wrote them. Evaluating the same step again replaces that folder's files.
    """
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep, create=False
    )
    latest = checkpointer.latest_saved_config()
    carries_weights = registry.spec(config.model.name).carries_weights
    if latest is None and carries_weights and not checkpointer.steps():
        return _evaluate_imported(config, workdir, services.evaluations)
    if latest is None:
        # No step, or none whose config reads: restore_latest names the unreadable steps.
        checkpointer.restore_latest(None, None, config)
        raise ValueError(f"--workdir={workdir} holds no checkpoint to evaluate")
    saved_step, saved = latest
    ignored, _ = checkpoint_lib.config_changes(saved, config)
    config = checkpoint_lib.evaluation_config(saved, config)
    if ignored:
        print(
            f"evaluating with the settings saved in the checkpoint at step {saved_step}, not "
            f"the command line's: {'; '.join(ignored)}",
            flush=True,
        )
    model = build_model(config.model)
    if services.evaluations is not None:
        services.evaluations.check_eval_config(config)
    optimizer, _ = optimizer_lib.build_optimizer(
        config.optimizer, config.train.num_steps, config.train.trainable
    )
    mesh = mesh_lib.make_mesh(config.mesh)
    abstract_state = state_lib.abstract_train_state(model, optimizer, config)
    shardings = sharding.state_shardings(abstract_state, mesh, config.sharding_rules)
    target = checkpoint_lib.with_shardings(abstract_state, shardings)
    restored = checkpointer.restore_latest(target, None, config, report_changes=False)
    state, step, _ = restored
    checkpointer.close()
    variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    return _evaluate_into_step_folder(services.evaluations, model, variables, config, workdir, step)


def _evaluate_imported(config: ml_collections.ConfigDict, workdir: str, evaluations) -> dict:
    """--mode=eval of a model whose file carries its weights (an ONNX graph) before any
    training: the file's own weights, as step 0."""
    from facemoe_jax.models import onnx_graph

    model = build_model(config.model)
    if evaluations is not None:
        evaluations.check_eval_config(config)
    variables = onnx_graph.onnx_variables(model.graph)
    print(f"evaluating {config.model.onnx_path} as it is (no checkpoint in {workdir})", flush=True)
    return _evaluate_into_step_folder(evaluations, model, variables, config, workdir, 0)


def _evaluate_into_step_folder(evaluations, model, variables, config, workdir, step: int) -> dict:
    """run_evaluations with its files and metrics.jsonl in workdir/eval/step<N>_eval."""
    outputs = eval_outputs(step)
    out_dir = paths.workdir_path(workdir) / outputs
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)  # metrics.jsonl opens in it
    writer = make_writer(os.fspath(out_dir))
    results = run_evaluations(evaluations, model, variables, config, workdir, step, writer, outputs)
    writer.flush()
    # Training's own results, if any, stay in eval/results.json.
    print(f"wrote {os.fspath(out_dir)}/results.json", flush=True)
    return results


def eval_outputs(step: int) -> str:
    """The folder, under the workdir, of --mode=eval's files for the checkpoint at `step`."""
    return f"eval/step{int(step)}_eval"
