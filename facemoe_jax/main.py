r"""Command line: train or evaluate a face model from a config file.

  python -m facemoe_jax.main --config configs/demo.py --workdir /tmp/demo
  python -m facemoe_jax.main --config configs/vit_b_moe.py --workdir W --config.train.num_steps=2
  python -m facemoe_jax.main --config configs/demo.py --workdir /tmp/demo --mode=eval

Every config field can be overridden with --config.<path>=<value>. Running the same command on the
same workdir continues from the latest checkpoint. Configuration mistakes end with one line
naming the field and value (exit status 2), not a traceback.
"""

import os
import sys

# TensorFlow (pulled in by clu's writers and TFDS) is only a CPU helper here: keep it off the
# accelerators JAX uses, and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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
    "train (then evaluate), eval, export (W/export/model.pt, .safetensors, .onnx, config.json) "
    "or import (train starting from --config.init_from=PyTorch weights).",
)


def _hide_accelerators_from_tensorflow():
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (ImportError, RuntimeError, ValueError):
        pass


def run(config, workdir: str, mode: str) -> dict:
    import jax

    from facemoe_jax.parallel import multihost

    if mode in ("eval", "export") and "://" not in workdir and not os.path.isdir(workdir):
        # Refuse before anything (Orbax, writers) could create it as a side effect.
        raise ValueError(
            f"--workdir={workdir} does not exist: --mode={mode} reads the checkpoints of a "
            "trained workdir"
        )
    multihost.initialize_from_environment()  # before anything touches a device
    jax.config.update("jax_threefry_partitionable", True)
    if mode == "export":
        from facemoe_jax.export.workdir import export_workdir

        return export_workdir(workdir)
    if mode == "import":
        if not config.get("init_from"):
            raise ValueError("--mode=import needs --config.init_from=/path/to/model.pt")
        mode = "train"
    if mode == "train":
        from facemoe_jax.train.loop import train_and_evaluate

        return train_and_evaluate(config, workdir)
    from facemoe_jax.train.loop import evaluate_checkpoint

    return evaluate_checkpoint(config, workdir)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        _fail("both --config and --workdir are required")
    _hide_accelerators_from_tensorflow()
    logging.set_verbosity(logging.WARNING)
    try:
        run(_CONFIG.value, _WORKDIR.value, _MODE.value)
    except (ValueError, KeyError, OSError) as e:
        _fail(str(e.args[0]) if e.args else repr(e))


def _fail(message: str):
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses flags and config overrides; a mistake ends in one line naming the flag."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (KeyError, AttributeError) as e:  # ml_collections: an override names no field
        while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError(...))
            e = e.args[0]
        detail = str(e.args[0]) if e.args else ""
        missing = detail.split("\n")[0].strip("'\"")
        culprit = next((a for a in argv if a.startswith("--config.") and missing in a), None)
        _fail(f"unknown config field in {culprit or 'a --config override'}: {detail}")


def _run_cli():
    argv = _parse_flags(sys.argv)
    logging.use_absl_handler()
    main(argv)


if __name__ == "__main__":
    _run_cli()
