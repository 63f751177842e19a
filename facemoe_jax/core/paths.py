"""Where a run's files live (a local folder or a URL through epath), and quiet TensorFlow: the
two things every layer that touches files needs."""

import contextlib
import os
import sys

from etils import epath

# TensorFlow's C++ start-up notices (oneDNN, CPU features) and absl's "before InitializeLog"
# line; set before TensorFlow could be imported by anything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def workdir_path(workdir) -> epath.Path:
    """The workdir as an epath.Path: absolute when local (Orbax needs it), a URL kept a URL."""
    workdir = os.fspath(workdir)
    if is_remote(workdir):
        return epath.Path(workdir)
    return epath.Path(os.path.abspath(workdir))


def bucket_of(url: str) -> str:
    """gs://bucket/runs/x -> gs://bucket."""
    scheme, rest = os.fspath(url).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def copy_tree(local_dir: str, target) -> None:
    """Copies the files under a local folder to `target` (an epath.Path, local or a URL)."""
    target = epath.Path(target)
    for root, _, files in os.walk(local_dir):
        relative = os.path.relpath(root, local_dir)
        folder = target if relative == "." else target / relative
        if files:
            folder.mkdir(parents=True, exist_ok=True)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                (folder / name).write_bytes(f.read())


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null: C++ libraries write there directly."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_TF_READY = False


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (if installed) once with its start-up notices silenced, and keeps it
    off the GPUs/TPUs JAX uses. Anything that may import TensorFlow calls this first."""
    global _TF_READY
    if _TF_READY:
        return
    _TF_READY = True
    with _stderr_silenced():
        try:
            import tensorflow as tf
        except ImportError:
            return
        try:
            tf.get_logger().setLevel("ERROR")
            tf.config.set_visible_devices([], "GPU")
            tf.config.set_visible_devices([], "TPU")
        except (RuntimeError, ValueError):
            pass
