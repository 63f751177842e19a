"""The train loop: set up, compile the step ahead of time, train, checkpoint, evaluate.

Sections, in order: (1) validate the config and build model, mesh, optimiser and data; (2) create
or restore the state; (3) lower and compile the jitted step once, logging compile seconds and
FLOPs per step; (4) the step loop with progress, metrics and checkpoints; (5) final evaluation of
every set in config.eval (evaluate/suite.py), written to workdir/eval/ with its pictures.
"""

import logging
import math
import os
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from facemoe_jax.core import huge_pages, messages, paths
from facemoe_jax.data import augment as augment_lib
from facemoe_jax.data import pipeline, sources
from facemoe_jax.evaluate import suite as eval_suite
from facemoe_jax.losses import recognizability
from facemoe_jax.models import build_model
from facemoe_jax.core.progress import format_duration
from facemoe_jax.parallel import mesh as mesh_lib
from facemoe_jax.parallel import sharding
from facemoe_jax.train import checkpoint as checkpoint_lib
from facemoe_jax.train import distill as distill_lib
from facemoe_jax.train import mfu as mfu_lib
from facemoe_jax.train import optimizer as optimizer_lib
from facemoe_jax.train import state as state_lib
from facemoe_jax.train import step as step_lib
from facemoe_jax.train import trainable as trainable_lib
from facemoe_jax.train.writers import make_writer

# Exit status of a run stopped by SIGTERM/SIGINT after saving its checkpoint (EX_TEMPFAIL: run
# the same command again to continue).
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """SIGTERM/SIGINT (or JAX's preemption notice) stopped the run after a checkpoint."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class NumericalFault(RuntimeError):
    """config.train.max_bad_steps steps in a row had a non-finite loss or gradient."""


class PreemptionWatch:
    """The first SIGTERM/SIGINT asks the loop to finish its step, save and stop; a second one
    kills the process at once (the default disposition is restored by the first).

    In a multi-process run, JAX's preemption service owns SIGTERM and picks one step for all
    hosts (`multihost_utils.reached_preemption_sync_point`); SIGINT is handled here, per host.
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}
        self._multiprocess = jax.process_count() > 1
        signals = [signal.SIGINT] if self._multiprocess else [signal.SIGTERM, signal.SIGINT]
        for signum in signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (a test harness): no handler
                pass

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name
        for other in self._previous:
            signal.signal(other, signal.SIG_DFL)  # a second signal ends the process at once
        messages.say(
            f"{self.signal_name}: finishing this step, saving a checkpoint and stopping "
            "(send it again to stop at once, without a checkpoint)"
        )

    def reached(self, step: int) -> bool:
        if self.signal_name is not None:
            return True
        if self._multiprocess:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = "preemption notice"
                    return True
            except RuntimeError:  # the preemption service is disabled
                pass
        return False

    def restore(self):
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous)
            except (ValueError, TypeError):
                pass


def _test_step_seconds() -> float:
    """Test hook: FACEMOE_TEST_STEP_SECONDS=0.3 sleeps that long after each step, so a test can
    signal or kill a run at a moment of its choice."""
    return float(os.environ.get("FACEMOE_TEST_STEP_SECONDS", "0") or 0)


def _test_nan_steps() -> set[int]:
    """Test hook: FACEMOE_TEST_NAN_STEPS="5,6" feeds NaN images at those steps."""
    text = os.environ.get("FACEMOE_TEST_NAN_STEPS", "").strip()
    return {int(s) for s in text.split(",") if s.strip()} if text else set()


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
    model, variables, config, workdir: str, step: int, writer, outputs: str = "eval"
) -> dict:
    """evaluate/suite.py's evaluations, their files in workdir/`outputs`. evaluate/ writes with
    local file calls, so for a URL workdir it writes into a local temporary folder that is then
    copied to the URL through epath (never a local folder named after the URL)."""
    if not paths.is_remote(workdir):
        return eval_suite.run_evaluations(model, variables, config, workdir, step, writer, outputs)
    with tempfile.TemporaryDirectory(prefix="facemoe_eval_") as local:
        results = eval_suite.run_evaluations(model, variables, config, local, step, writer, outputs)
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
    # An ONNX model's initial weights are its file's (models/onnx_graph.py), not random.
    pretrained = config.get("init_from") or config.model.name == "onnx"
    if enc_trained < enc_total and not pretrained:
        messages.warning(
            "part of the encoder is frozen but config.init_from is empty: the frozen "
            "weights are random (start from a pre-trained run: --config.init_from=WORKDIR)"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # A distillation run may first train its own teacher (config.distill.pretrain_teacher).
    config = distill_lib.with_pretrained_teacher(config, workdir)
    # ---- (1) Set-up: every check that can fail runs before anything is written.
    num_steps = config.train.num_steps
    if num_steps < 1:
        raise ValueError(f"config.train.num_steps={num_steps} must be >= 1")
    max_bad_steps = int(config.train.get("max_bad_steps", 10))
    if max_bad_steps < 1:
        raise ValueError(f"config.train.max_bad_steps={max_bad_steps} must be >= 1")
    model = build_model(config.model)
    step_lib.check_loss_config(config.loss)
    distill_lib.check_config(config)
    recognizability.check_config(config)
    eval_suite.check_eval_config(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_size(config.train.batch_size, mesh)
    sharding.check_config(config, mesh)
    optimizer, schedule = optimizer_lib.build_optimizer(
        config.optimizer, num_steps, config.train.get("trainable")
    )
    # The data before the state's shapes: config.data.num_classes=0 takes the data's count.
    source = sources.train_source(config)
    config = sources.with_data_counts(config, source)
    # The state's shapes: building them checks config.train.trainable against the parameters,
    # like every mistake here, before anything is written into the workdir.
    abstract_state = state_lib.abstract_train_state(model, optimizer, config)
    if config.get("init_from") and not os.path.exists(str(config.init_from)):
        raise ValueError(f"config.init_from={config.init_from!r} does not exist")
    sources.check_images(source, config)  # image folders: every file decodes, before compiling
    # The frozen distillation teacher (None without one): reloaded at every start, never saved.
    teacher, teacher_variables = distill_lib.load_teacher(config, mesh)
    # Paired batches ("image_hr": the geometry-only images) for a teacher or for RI's copies.
    paired = teacher is not None or recognizability.wants_clean_images(config)
    check_workdir(workdir)
    data_iter = pipeline.train_iterator(
        source,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        augment=augment_lib.Augmenter(config.data, paired=paired),
        image_size=config.model.image_size,
        worker_count=config.data.worker_count,
        max_bad_share=config.data.max_bad_share,
    )
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep
    )

    # ---- (2) State: restored into the current mesh's shardings, or created there. The saved
    # config is checked first (another architecture or data is refused); unreadable steps are
    # skipped with a warning.
    # From here a SIGTERM/SIGINT is held until the first step is done, then saved (section 4).
    watch = PreemptionWatch()
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
        if config.get("init_from"):
            from facemoe_jax.train.init_from import initialize_from

            state = initialize_from(state, config)
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
    if paired:
        batch_spec["image_hr"] = batch_spec["image"]
    nan_steps, step_seconds = _test_nan_steps(), _test_step_seconds()
    if nan_steps:  # the test hook adds a replicated scalar to the images (NaN at those steps)
        batch_spec["test_poison"] = jax.ShapeDtypeStruct(
            (), jnp.float32, sharding=mesh_lib.replicated(mesh)
        )
    train_step = jax.jit(
        step_lib.make_train_step(model, config, optimizer, schedule, teacher),
        donate_argnums=0,
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
    )
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # traced under the mesh: expert-parallel MoE, sharded classifier
        compiled = train_step.lower(state, batch_spec, teacher_variables).compile()
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

    # ---- (4) Train. A step with a non-finite loss or gradient leaves the state unchanged
    # (train/skipped_steps); its flag is read one step late, so the host never waits on the
    # device. SIGTERM/SIGINT: finish the step, save it, stop (Preempted).
    pending_flag = None  # (step, device scalar: 1 = skipped)

    def count_bad(flag_step, flag):
        bad = float(flag) > 0.5
        loop_state["skipped_steps"] += int(bad)
        loop_state["bad_streak"] = loop_state["bad_streak"] + 1 if bad else 0
        if bad:
            messages.say(
                f"step {flag_step}: non-finite loss or gradient, update skipped "
                f"({loop_state['bad_streak']} in a row)"
            )
        return loop_state["bad_streak"] >= max_bad_steps

    sums, count, interval_start = None, 0, time.perf_counter()
    try:
        for step in range(start + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = mesh_lib.global_batch(next(data_iter), mesh)
                if nan_steps:
                    poison = np.float32(math.nan if step in nan_steps else 0.0)
                    batch["test_poison"] = jax.device_put(poison, mesh_lib.replicated(mesh))
                state, metrics = compiled(state, batch, teacher_variables)
            checkpointer.poll()
            if step_seconds:
                time.sleep(step_seconds)
            too_many_bad = pending_flag is not None and count_bad(*pending_flag)
            pending_flag = (step, metrics["train/skipped"])
            preempted = watch.reached(step)
            log_now = step % config.train.log_every_steps == 0 or step == num_steps
            save_now = checkpointer.should_save(step) or step == num_steps or preempted
            if log_now or save_now or too_many_bad:  # counts exact at logs and checkpoints
                too_many_bad = count_bad(*pending_flag) or too_many_bad
                pending_flag = None
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            count += 1
            if log_now:
                means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
                del means["train/skipped"]
                seconds = time.perf_counter() - interval_start
                means["train/steps_per_sec"] = count / seconds
                means["train/img_per_sec"] = count * config.train.batch_size / seconds
                means["train/img_per_sec_per_device"] = (
                    means["train/img_per_sec"] / jax.device_count()
                )
                means["data/skipped_records"] = data_iter.skipped_records  # this host, cumulative
                means["train/skipped_steps"] = loop_state["skipped_steps"]  # cumulative
                if flops:
                    means["train/gflops_per_sec_per_device"] = flops * count / seconds / 1e9
                    means["perf/mfu"] = mfu_lib.mfu(flops, count / seconds, peak)
                writer.write_scalars(step, means)
                eta = (num_steps - step) / means["train/steps_per_sec"]
                print(
                    f"step {step:>6}/{num_steps}: loss {means['train/loss']:.4f} "
                    f"acc {means['train/accuracy'] * 100:5.1f} % lr {means['train/lr']:.2e} "
                    f"{means['train/steps_per_sec']:.2f} steps/s "
                    f"{means['train/img_per_sec']:.0f} img/s "
                    f"ETA {format_duration(eta)}",
                    flush=True,
                )
                sums, count, interval_start = None, 0, time.perf_counter()
            if too_many_bad or preempted:
                writer.flush()
            if too_many_bad:
                checkpointer.save(step, state, data_iter, config, loop_state)
                checkpointer.wait()
                raise NumericalFault(
                    f"{max_bad_steps} steps in a row (up to step {step}) had a non-finite loss "
                    f"or gradient (config.train.max_bad_steps={max_bad_steps}): stopped; the "
                    f"last good state is saved in {checkpointer.directory / str(step)}"
                )
            if save_now:
                checkpointer.save(step, state, data_iter, config, loop_state)
            if preempted:
                checkpointer.wait()
                raise Preempted(
                    f"stopped by {watch.signal_name} at step {step} of {num_steps}: checkpoint "
                    f"saved in {checkpointer.directory / str(step)}; run the same command to "
                    "continue",
                    step,
                )
            if eval_suite.is_periodic_eval_step(config, step, num_steps):
                variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
                run_evaluations(model, variables, config, workdir, step, writer)
        checkpointer.wait()
    finally:
        watch.restore()
    _print_save_times(checkpointer)

    # ---- (5) Evaluate the final model: every set in config.eval (evaluate/suite.py).
    variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    results = run_evaluations(model, variables, config, workdir, num_steps, writer)
    writer.flush()
    checkpointer.close()
    return results


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


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
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
    if latest is None and config.model.name == "onnx" and not checkpointer.steps():
        return _evaluate_imported(config, workdir)
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
    eval_suite.check_eval_config(config)
    optimizer, _ = optimizer_lib.build_optimizer(
        config.optimizer, config.train.num_steps, config.train.get("trainable")
    )
    mesh = mesh_lib.make_mesh(config.mesh)
    abstract_state = state_lib.abstract_train_state(model, optimizer, config)
    shardings = sharding.state_shardings(abstract_state, mesh, config.sharding_rules)
    target = checkpoint_lib.with_shardings(abstract_state, shardings)
    restored = checkpointer.restore_latest(target, None, config, report_changes=False)
    state, step, _ = restored
    checkpointer.close()
    variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    return _evaluate_into_step_folder(model, variables, config, workdir, step)


def _evaluate_imported(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """--mode=eval of an ONNX model before any training: the file's own weights, as step 0."""
    from facemoe_jax.models import onnx_graph

    model = build_model(config.model)
    eval_suite.check_eval_config(config)
    variables = onnx_graph.onnx_variables(model.graph)
    print(f"evaluating {config.model.onnx_path} as it is (no checkpoint in {workdir})", flush=True)
    return _evaluate_into_step_folder(model, variables, config, workdir, 0)


def _evaluate_into_step_folder(model, variables, config, workdir: str, step: int) -> dict:
    """run_evaluations with its files and metrics.jsonl in workdir/eval/step<N>_eval."""
    outputs = eval_outputs(step)
    out_dir = paths.workdir_path(workdir) / outputs
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)  # metrics.jsonl opens in it
    writer = make_writer(os.fspath(out_dir))
    results = run_evaluations(model, variables, config, workdir, step, writer, outputs)
    writer.flush()
    # Training's own results, if any, stay in eval/results.json.
    print(f"wrote {os.fspath(out_dir)}/results.json", flush=True)
    return results


def eval_outputs(step: int) -> str:
    """The folder, under the workdir, of --mode=eval's files for the checkpoint at `step`."""
    return f"eval/step{int(step)}_eval"
