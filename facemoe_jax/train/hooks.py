"""The train loop's body, as hooks that run after every step, in order.

The loop (train/loop.py) runs the compiled step and then each hook's `after_step(run)`:
preemption, the bad-step guard, metrics logging, checkpointing, periodic evaluation. A hook reads
and sets fields of the shared `LoopRun`; the ones that end a run raise (Preempted,
NumericalFault) after saving. Extra hooks (a caller's, e.g. a test's) run first, right after the
step.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from facemoe_jax.core import messages
from facemoe_jax.core.progress import format_duration
from facemoe_jax.train import mfu as mfu_lib

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


@dataclasses.dataclass
class LoopRun:
    """What the hooks share: the run's fixed parts, and this step's facts."""

    config: Any
    num_steps: int
    writer: Any
    checkpointer: Any
    data_iter: Any
    loop_state: dict  # checkpointed counters: skipped_steps, bad_streak
    flops: float | None = None
    peak: float | None = None
    # This step's facts, set by the loop and the hooks before it.
    step: int = 0
    state: Any = None
    metrics: dict | None = None
    preempted: bool = False
    too_many_bad: bool = False

    @property
    def log_now(self) -> bool:
        every = self.config.train.log_every_steps
        return self.step % every == 0 or self.step == self.num_steps

    @property
    def save_now(self) -> bool:
        last = self.step == self.num_steps
        return self.checkpointer.should_save(self.step) or last or self.preempted

    def save(self) -> None:
        self.checkpointer.save(self.step, self.state, self.data_iter, self.config, self.loop_state)


class Hook:
    def after_step(self, run: LoopRun) -> None:
        pass


class PreemptionWatch(Hook):
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

    def after_step(self, run):
        run.checkpointer.poll()
        run.preempted = self.reached(run.step)

    def restore(self):
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous)
            except (ValueError, TypeError):
                pass


class BadStepGuard(Hook):
    """Counts steps whose update was skipped (non-finite loss or gradient). The flag is read one
    step late, so the host never waits on the device, except at logs and checkpoints, where the
    counts are made exact; config.train.max_bad_steps in a row end the run (CheckpointHook)."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.pending = None  # (step, device scalar: 1 = skipped)

    def _count(self, run, flag_step, flag) -> bool:
        bad = float(flag) > 0.5
        run.loop_state["skipped_steps"] += int(bad)
        run.loop_state["bad_streak"] = run.loop_state["bad_streak"] + 1 if bad else 0
        if bad:
            messages.say(
                f"step {flag_step}: non-finite loss or gradient, update skipped "
                f"({run.loop_state['bad_streak']} in a row)"
            )
        return run.loop_state["bad_streak"] >= self.max_bad_steps

    def after_step(self, run):
        too_many = self.pending is not None and self._count(run, *self.pending)
        self.pending = (run.step, run.metrics["train/skipped"])
        if run.log_now or run.save_now or too_many:
            too_many = self._count(run, *self.pending) or too_many
            self.pending = None
        run.too_many_bad = too_many


class MetricsLogger(Hook):
    """Means of the step metrics over each logging interval: to the writer and one line."""

    def __init__(self):
        self.sums, self.count, self.start = None, 0, time.perf_counter()

    def after_step(self, run):
        metrics = run.metrics
        self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
        self.count += 1
        if not run.log_now:
            return
        count, batch_size = self.count, run.config.train.batch_size
        means = {k: float(v) / count for k, v in jax.device_get(self.sums).items()}
        del means["train/skipped"]
        seconds = time.perf_counter() - self.start
        means["train/steps_per_sec"] = count / seconds
        means["train/img_per_sec"] = count * batch_size / seconds
        means["train/img_per_sec_per_device"] = means["train/img_per_sec"] / jax.device_count()
        means["data/skipped_records"] = run.data_iter.skipped_records  # this host, cumulative
        means["train/skipped_steps"] = run.loop_state["skipped_steps"]  # cumulative
        if run.flops:
            means["train/gflops_per_sec_per_device"] = run.flops * count / seconds / 1e9
            means["perf/mfu"] = mfu_lib.mfu(run.flops, count / seconds, run.peak)
        run.writer.write_scalars(run.step, means)
        eta = (run.num_steps - run.step) / means["train/steps_per_sec"]
        print(
            f"step {run.step:>6}/{run.num_steps}: loss {means['train/loss']:.4f} "
            f"acc {means['train/accuracy'] * 100:5.1f} % lr {means['train/lr']:.2e} "
            f"{means['train/steps_per_sec']:.2f} steps/s "
            f"{means['train/img_per_sec']:.0f} img/s "
            f"ETA {format_duration(eta)}",
            flush=True,
        )
        self.sums, self.count, self.start = None, 0, time.perf_counter()


class CheckpointHook(Hook):
    """Saves at config.checkpoint.every_steps, at the last step and when stopping; stops the run
    (after saving) on preemption or too many bad steps in a row."""

    def __init__(self, watch: PreemptionWatch, max_bad_steps: int):
        self.watch, self.max_bad_steps = watch, max_bad_steps

    def after_step(self, run):
        if run.too_many_bad or run.preempted:
            run.writer.flush()
        where = run.checkpointer.directory / str(run.step)
        if run.too_many_bad:
            run.save()
            run.checkpointer.wait()
            raise NumericalFault(
                f"{self.max_bad_steps} steps in a row (up to step {run.step}) had a non-finite "
                f"loss or gradient (config.train.max_bad_steps={self.max_bad_steps}): stopped; "
                f"the last good state is saved in {where}"
            )
        if run.save_now:
            run.save()
        if run.preempted:
            run.checkpointer.wait()
            raise Preempted(
                f"stopped by {self.watch.signal_name} at step {run.step} of {run.num_steps}: "
                f"checkpoint saved in {where}; run the same command to continue",
                run.step,
            )


class PeriodicEvaluation(Hook):
    """Every config.eval.every_steps steps (not the last: the final evaluation's), `evaluate`
    (the run's model variables, step) runs."""

    def __init__(self, is_due: Callable[[int], bool], evaluate: Callable[[dict, int], Any]):
        self.is_due, self.evaluate = is_due, evaluate

    def after_step(self, run):
        if self.is_due(run.step):
            state = run.state
            variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
            self.evaluate(variables, run.step)
