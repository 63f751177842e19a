r"""Command line: train or evaluate a face model from a config file.

  python -m facemoe_jax.main --config configs/demo.py --workdir /tmp/demo
  python -m facemoe_jax.main --config configs/vit_b_moe.py --workdir W --config.train.num_steps=2
  python -m facemoe_jax.main --config configs/demo.py --workdir /tmp/demo --mode=eval

Every config field can be overridden with --config.<path>=<value>. Running the same command on the
same workdir continues from the latest readable checkpoint. --mode=eval and --mode=export use the
model, data and seed saved with the checkpoint (training flags need not be repeated; eval takes
config.eval.* from the command line) and --mode=eval writes W/eval/step<N>_eval/, leaving the
training run's W/eval/results.json as it was. Exit status: 0 done; 2 a mistake
in the command, config or inputs (one line naming the field or path, not a traceback); 1 a
fault during the run (unreadable data past config.data.max_bad_share, config.train.max_bad_steps
non-finite steps in a row), also one line; 75 stopped by SIGTERM/SIGINT after saving a
checkpoint at the step it was at (run the same command to continue). A second SIGTERM/SIGINT
ends the process at once.
"""

import os
import sys

# TensorFlow (pulled in by clu's writers and TFDS) is only a CPU helper here: imported lazily
# and quietly (facemoe_jax/train/writers.py), kept off the accelerators JAX uses.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from facemoe_jax.core import cli, huge_pages, messages  # noqa: E402

# Config files import their shared builder as `configs.common`: make the project root importable
# whatever the current directory is.
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PROJECT_ROOT not in sys.path:
    sys.path.insert(0, _PROJECT_ROOT)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "export", "import"],
    "train (then evaluate), eval (the latest checkpoint, into W/eval/step<N>_eval), export "
    "(W/export/model.pt, .safetensors, .onnx, config.json) or import (train starting from "
    "--config.init_from=PyTorch weights).",
)


def run(config, workdir: str, mode: str, extra_hooks: tuple = ()) -> dict:
    import jax

    from facemoe_jax.parallel import multihost

    if mode in ("eval", "export") and "://" not in workdir and not os.path.isdir(workdir):
        from facemoe_jax.models import registry

        if mode == "eval" and registry.spec(config.model.name).carries_weights:
            os.makedirs(workdir)  # an ONNX model is evaluated as its file is (no training yet)
        else:
            # Refuse before anything (Orbax, writers) could create it as a side effect.
            raise ValueError(
                f"--workdir={workdir} does not exist: --mode={mode} reads the checkpoints of a "
                "trained workdir"
            )
    if str(config.data.train).startswith("tfds:"):
        # TFDS imports TensorFlow: first quietly, and off the accelerators JAX uses.
        from facemoe_jax.core.paths import import_tensorflow_quietly

        import_tensorflow_quietly()
    multihost.initialize_from_environment()  # before anything touches a device
    jax.config.update("jax_threefry_partitionable", True)
    if mode == "export":
        from facemoe_jax.export.workdir import export_workdir

        alpha = config.export.merge_lora_alpha
        return export_workdir(workdir, merge_lora_alpha=alpha)
    if mode == "import":
        if not config.init_from:
            raise ValueError("--mode=import needs --config.init_from=/path/to/model.pt")
        mode = "train"
    from facemoe_jax import pipelines

    if mode == "train":
        return pipelines.train_and_evaluate(config, workdir, extra_hooks)
    return pipelines.evaluate_checkpoint(config, workdir)


def main(argv, extra_hooks: tuple = ()):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        cli.fail("both --config and --workdir are required")
    logging.set_verbosity(logging.WARNING)
    from facemoe_jax.data.pipeline import BadDataError
    from facemoe_jax.train.hooks import NumericalFault, Preempted, PREEMPTED_EXIT_CODE

    try:
        run(_CONFIG.value, _WORKDIR.value, _MODE.value, extra_hooks)
    except Preempted as e:
        messages.say(messages.one_line(e))
        sys.exit(PREEMPTED_EXIT_CODE)
    except (BadDataError, NumericalFault) as e:
        cli.fail(str(e.args[0]) if e.args else repr(e), status=1)
    except (ValueError, KeyError, OSError) as e:
        cli.fail(str(e.args[0]) if e.args else repr(e))


def _run_cli(extra_hooks: tuple = ()):
    """The command line; extra_hooks (train/hooks.py) run after every train step, first."""
    # Before JAX starts: XLA:CPU's step buffers in 2 MiB pages (15-20 % off a CPU train step).
    huge_pages.restart_with_huge_pages()
    argv = cli.parse_flags(sys.argv)
    logging.use_absl_handler()
    main(argv, extra_hooks)


if __name__ == "__main__":
    _run_cli()
