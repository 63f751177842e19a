"""Files under a workdir (issue 14): one path abstraction (etils.epath) for local folders and
URLs, metrics.jsonl with one object per step and no duplicates after a resume, the resume check
of a saved config.

The remote test registers an in-memory filesystem under the scheme `mem://` (fsspec's
MemoryFileSystem behind epath) and checks that the workdir, its probe and metrics.jsonl land
there and nothing lands on local disk.
"""

import io
import functools
import json
import os
import types
import subprocess
import sys

import pytest
from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath, register

from facemoe_jax.core import paths
from facemoe_jax.train import checkpoint as checkpoint_lib
from facemoe_jax.train import writers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rows(path):
    return [json.loads(line) for line in open(path)]


def test_jsonl_one_object_per_step_and_resume_drops_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = writers.JsonlWriter(path)
    w.write_scalars(2, {"train/loss": 3.0})
    w.write_scalars(2, {"eval/acc": 0.5})  # another writer, the same step: merged
    w.write_scalars(4, {"train/loss": 2.0})
    w.write_scalars(6, {"train/loss": 1.0})
    w.close()
    assert rows(path) == [
        {"step": 2, "train/loss": 3.0, "eval/acc": 0.5},
        {"step": 4, "train/loss": 2.0},
        {"step": 6, "train/loss": 1.0},
    ]
    with open(path, "a") as f:
        f.write('{"step": 8, "train/lo')  # a line cut by SIGKILL
    # Resumed from the checkpoint at step 4: steps 6 and 8 will be trained (and logged) again.
    w = writers.JsonlWriter(path, resume_step=4)
    w.write_scalars(4, {"eval/acc": 0.7})  # more of the restored step: merged into its row
    w.write_scalars(6, {"train/loss": 1.5})
    w.close()
    assert rows(path) == [
        {"step": 2, "train/loss": 3.0, "eval/acc": 0.5},
        {"step": 4, "train/loss": 2.0, "eval/acc": 0.7},
        {"step": 6, "train/loss": 1.5},
    ]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_config_changes_split_fixed_fields_from_knobs():
    from configs import demo

    saved = demo.get_config()
    now = demo.get_config()
    now.optimizer.learning_rate = 1e-4
    now.train.num_steps = 900
    now.data.worker_count = 4
    now.model.conv_algorithm = "direct"
    assert checkpoint_lib.config_changes(saved, now) == (
        [],
        [
            "data.worker_count 0 -> 4",
            "model.conv_algorithm 'winograd' -> 'direct'",
            "optimizer.learning_rate 0.002 -> 0.0001",
            "train.num_steps 700 -> 900",
        ],
    )
    now.model.num_experts = 8
    now.data.train = "folder:/faces"
    now.seed = 1
    fixed, _ = checkpoint_lib.config_changes(saved, now)
    assert fixed == [
        "data.train (checkpoint 'synthetic', now 'folder:/faces')",
        "model.num_experts (checkpoint 4, now 8)",
        "seed (checkpoint 0, now 1)",
    ]


@pytest.fixture
def mem_scheme(monkeypatch):
    """`mem://bucket/...` as an epath scheme backed by fsspec's in-memory filesystem."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")

    class MemBackend(backend_lib._FileSystemSpecBackend):  # noqa: SLF001 - test double
        def fs(self, path):
            return fs

    backend = MemBackend()
    monkeypatch.setattr(gpath, "_URI_PREFIXES", (*gpath._URI_PREFIXES, "mem://"))
    monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"mem"})
    monkeypatch.setitem(gpath._URI_MAP_ROOT, "mem://", "/mem/")
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "mem", backend)
    real_backend = gpath._GPath._backend

    def pick_backend(self):
        return backend if self._uri_scheme == "mem" else real_backend.fget(self)

    monkeypatch.setattr(gpath._GPath, "_backend", property(pick_backend))
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "mem://", gpath.PosixGPath)
    return fs


def test_remote_workdir_goes_through_epath_and_nothing_lands_locally(
    mem_scheme, tmp_path, monkeypatch
):
    from facemoe_jax.train import loop

    monkeypatch.chdir(tmp_path)
    workdir = "mem://bucket/runs/x"
    assert str(paths.workdir_path(workdir)) == workdir  # a URL stays a URL (no abspath)
    loop.check_workdir(workdir)
    assert epath.Path(workdir).is_dir()
    assert not epath.Path(workdir + "/.write_test").exists()  # the probe was removed

    writer = writers.make_writer(workdir, resume_step=0)
    writer.write_scalars(1, {"train/loss": 2.0})
    writer.write_scalars(1, {"train/accuracy": 0.25})
    writer.write_scalars(2, {"train/loss": 1.0})
    writer.flush()
    text = epath.Path(workdir, "metrics.jsonl").read_text()
    assert [json.loads(line) for line in text.splitlines()] == [
        {"step": 1, "train/loss": 2.0, "train/accuracy": 0.25},
        {"step": 2, "train/loss": 1.0},
    ]
    # A resume from step 1 drops step 2 in the bucket too.
    writers.JsonlWriter(epath.Path(workdir, "metrics.jsonl"), resume_step=1).close()
    assert json.loads(epath.Path(workdir, "metrics.jsonl").read_text()) == {
        "step": 1,
        "train/loss": 2.0,
        "train/accuracy": 0.25,
    }
    assert os.listdir(tmp_path) == []  # no local `mem:` folder, no probe, no metrics
    assert not os.path.exists("/mem")
    assert sorted(mem_scheme.store) == ["mem://bucket/runs/x/metrics.jsonl"]


def test_checkpointer_keeps_a_url_a_url():
    # Orbax needs absolute local paths; a URL must not become <cwd>/gs:/bucket/...
    assert str(paths.workdir_path("gs://bucket/runs/x") / "checkpoints") == (
        "gs://bucket/runs/x/checkpoints"
    )
    assert paths.workdir_path("runs/x") == epath.Path(os.path.abspath("runs/x"))
    assert paths.bucket_of("gs://my-bucket/runs/x") == "gs://my-bucket"


def test_evaluation_files_of_a_remote_workdir_land_at_the_url(mem_scheme, tmp_path, monkeypatch):
    from facemoe_jax.train import loop

    monkeypatch.chdir(tmp_path)
    seen = []

    def fake_suite(model, variables, config, workdir, step, writer, outputs="eval"):
        # evaluate/suite.py writes with os/open under workdir/outputs
        seen.append(workdir)
        os.makedirs(os.path.join(workdir, outputs), exist_ok=True)
        with open(os.path.join(workdir, outputs, "results.json"), "w") as f:
            json.dump({"step": step}, f)
        return {"step": step}

    evaluations = types.SimpleNamespace(run_evaluations=fake_suite)
    run = functools.partial(loop.run_evaluations, evaluations, None, None, None)
    assert run("mem://bucket/run", 7, None) == {"step": 7}
    assert "://" not in seen[0] and not os.path.exists(seen[0])  # a local temporary folder
    assert json.loads(epath.Path("mem://bucket/run/eval/results.json").read_text()) == {"step": 7}
    # --mode=eval's folder beside the training run's results, not over them.
    run("mem://bucket/run", 9, None, loop.eval_outputs(9))
    assert json.loads(epath.Path("mem://bucket/run/eval/step9_eval/results.json").read_text()) == {
        "step": 9
    }
    assert json.loads(epath.Path("mem://bucket/run/eval/results.json").read_text()) == {"step": 7}
    assert os.listdir(tmp_path) == []


def test_fields_added_to_the_code_since_the_checkpoint_are_not_refused():
    from configs import demo

    saved = demo.get_config().to_dict()
    del saved["model"]["dtype"]  # a checkpoint from before the field existed
    fixed, knobs = checkpoint_lib.config_changes(saved, demo.get_config())
    assert fixed == [] and knobs == ["model.dtype (new) 'float32'"]


def test_evaluation_config_is_the_checkpoints_own_with_the_command_lines_eval():
    from configs import demo

    trained = demo.get_config()
    trained.data.train = "folder:/faces"
    trained.data.num_classes = 3
    trained.seed = 5
    trained.model.quality_head = True
    saved = trained.to_dict()
    del saved["model"]["quality_head_input"]  # a checkpoint from before the field existed
    del saved["model"]["dtype"]
    now = demo.get_config()  # the demo's command line without the training's data flags
    now.eval.synthetic_pairs = 40
    now.mesh.expert = 2
    now.optimizer.learning_rate = 1.0

    config = checkpoint_lib.evaluation_config(saved, now)
    assert (config.data.train, config.data.num_classes, config.seed) == ("folder:/faces", 3, 5)
    assert config.model.quality_head and config.optimizer.learning_rate == 0.002
    assert config.eval.synthetic_pairs == 40 and config.mesh.expert == 2  # the command line's
    assert config.sharding_rules == now.sharding_rules
    # A field the checkpoint predates: the value it had before it existed, else the code's.
    assert config.model.quality_head_input == "embedding" and config.model.dtype == "float32"
    # The resume check sees no architecture or data change against it.
    assert checkpoint_lib.config_changes(saved, config)[0] == []


def test_a_restore_writes_nothing_on_stderr(tmp_path):
    """Orbax logs through absl; a Checkpointer's metadata() on the state item looked for a
    step-level metadata file there and logged "Metadata file does not exist" at every restore."""
    script = f"""
import jax.numpy as jnp
from absl import logging
from flax import struct
from facemoe_jax.train.checkpoint import Checkpointer

logging.use_absl_handler()  # as facemoe_jax.main does
logging.set_verbosity(logging.WARNING)

@struct.dataclass
class State:  # the shape of train/state.py's TrainState, in three fields
    params: dict
    step: object
    aux: dict

state = State(params={{"w": jnp.arange(6.0).reshape(2, 3)}}, step=jnp.int32(4), aux={{}})
saver = Checkpointer({str(tmp_path)!r}, every_steps=1, max_to_keep=2)
saver.save(4, state, None, {{"model": {{"name": "tiny"}}}}, {{"skipped_steps": 0}})
saver.close()
reader = Checkpointer({str(tmp_path)!r}, every_steps=1, max_to_keep=2, create=False)
restored, step, loop_state = reader.restore_latest(state, None, {{"model": {{"name": "tiny"}}}})
reader.close()
assert step == 4 and loop_state == {{"skipped_steps": 0}}
assert restored.params["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
print("restored")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "restored", done.stderr[-3000:]
    assert done.stderr == "", done.stderr


def test_study_files_go_through_epath(mem_scheme, tmp_path, monkeypatch):
    from facemoe_jax.study import runner, synthetic

    monkeypatch.chdir(tmp_path)
    assert runner.read_json("mem://bucket/study/row.json") is None
    epath.Path("mem://bucket/study").mkdir(parents=True, exist_ok=True)
    epath.Path("mem://bucket/study/row.json").write_text('{"fingerprint": "abc"}')
    assert runner.read_json("mem://bucket/study/row.json") == {"fingerprint": "abc"}
    runner.plot_trade_off({}, "mem://bucket/study/hr_vs_lr.png", synthetic.PLOT)
    assert epath.Path("mem://bucket/study/hr_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path) == []


def test_export_to_a_remote_workdir_lands_at_the_url(mem_scheme, tmp_path, monkeypatch):
    import torch
    from configs import common

    from facemoe_jax.export import workdir as export_lib
    from facemoe_jax.interop import load as load_lib
    from tests.interop.test_convert import random_variables, tiny_vit_config

    monkeypatch.chdir(tmp_path)
    config = common.get_base_config()
    config.model = tiny_vit_config()
    _, variables = random_variables(config.model)
    seen = []

    def restore(workdir, step=None):  # the checkpoint restore has its own remote tests
        seen.append(workdir)
        return config, variables, 12

    monkeypatch.setattr(load_lib, "restore_workdir", restore)
    result = export_lib.export_workdir("mem://bucket/run", onnx=False)
    assert seen == ["mem://bucket/run"]  # not made absolute: no <cwd>/mem:/bucket
    assert result["pt"] == "mem://bucket/run/export/model.pt"
    assert sorted(mem_scheme.store) == [
        f"mem://bucket/run/export/{name}"
        for name in ("config.json", "model.pt", "model.safetensors")
    ]
    saved = torch.load(io.BytesIO(epath.Path(result["pt"]).read_bytes()), weights_only=True)
    assert any(name.endswith("num_batches_tracked") for name in saved)
    assert all(v.item() == 12 for k, v in saved.items() if k.endswith("num_batches_tracked"))
    assert json.loads(epath.Path(result["config"]).read_text())["step"] == 12
    assert os.listdir(tmp_path) == []
