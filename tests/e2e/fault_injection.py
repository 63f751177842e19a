"""`python -m facemoe_jax.main` with faults injected from outside the production code, for
tests/test_faults.py:

  TEST_FAULT_STEP_SECONDS=0.3  a hook that sleeps that long after each step, so a test can
                               signal or kill the run at a moment of its choice;
  TEST_FAULT_NAN_STEPS=3,5,6   an objective whose loss is NaN at those steps (0 otherwise), so
                               the step's non-finite guard skips them.

Run it as `python tests/fault_injection.py --config ... --workdir ...` from the project root.
Without either variable it is the plain command line.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from facemoe_jax import main  # noqa: E402


class SleepAfterStep:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def after_step(self, run):
        time.sleep(self.seconds)


def register_nan_steps(steps: frozenset) -> None:
    import jax.numpy as jnp

    from facemoe_jax.train import objectives

    class NanAtSteps(objectives.Objective):
        name = "test_nan_steps"

        @classmethod
        def active(cls, config):
            return True

        def loss(self, ctx, params, state, batch, forward, frozen):
            step = state.step + 1  # the loop's 1-based number of the step being taken
            poisoned = jnp.isin(step, jnp.asarray(sorted(steps), jnp.int32))
            return jnp.where(poisoned, jnp.nan, 0.0).astype(jnp.float32), {}, None

    objectives.register(NanAtSteps)


if __name__ == "__main__":
    hooks = []
    seconds = float(os.environ.get("TEST_FAULT_STEP_SECONDS") or 0)
    if seconds:
        hooks.append(SleepAfterStep(seconds))
    nan_steps = os.environ.get("TEST_FAULT_NAN_STEPS", "").strip()
    if nan_steps:
        register_nan_steps(frozenset(int(s) for s in nan_steps.split(",") if s.strip()))
    main._run_cli(tuple(hooks))
