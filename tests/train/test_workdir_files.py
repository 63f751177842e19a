"""Files under a workdir (issue 14): one path abstraction (etils.epath) for local folders and
URLs, metrics.jsonl with one object per step and no duplicates after a resume, the resume check
of a saved config.

The remote test registers an in-memory filesystem under the scheme `mem://` (fsspec's
MemoryFileSystem behind epath) and checks that the workdir, its probe and metrics.jsonl land
there and nothing lands on local disk.
"""

import io
import json
import os

import pytest
from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath, register

from facemoe_jax.train import checkpoint as checkpoint_lib
from facemoe_jax.train import writers


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
    assert checkpoint_lib.config_changes(saved, now) == (
        [],
        ["data.worker_count 0 -> 4", "optimizer.learning_rate 0.002 -> 0.0001",
         "train.num_steps 700 -> 900"],
    )  # fmt: skip
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
    assert str(writers.workdir_path(workdir)) == workdir  # a URL stays a URL (no abspath)
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
        "step": 1, "train/loss": 2.0, "train/accuracy": 0.25,
    }  # fmt: skip
    assert os.listdir(tmp_path) == []  # no local `mem:` folder, no probe, no metrics
    assert not os.path.exists("/mem")
    assert sorted(mem_scheme.store) == ["mem://bucket/runs/x/metrics.jsonl"]


def test_checkpointer_keeps_a_url_a_url():
    # Orbax needs absolute local paths; a URL must not become <cwd>/gs:/bucket/...
    assert str(writers.workdir_path("gs://bucket/runs/x") / "checkpoints") == (
        "gs://bucket/runs/x/checkpoints"
    )
    assert writers.workdir_path("runs/x") == epath.Path(os.path.abspath("runs/x"))
    assert writers.bucket_of("gs://my-bucket/runs/x") == "gs://my-bucket"


def test_evaluation_files_of_a_remote_workdir_land_at_the_url(mem_scheme, tmp_path, monkeypatch):
    from facemoe_jax.train import loop

    monkeypatch.chdir(tmp_path)
    seen = []

    def fake_suite(model, variables, config, workdir, step, writer):
        # evaluate/suite.py writes with os/open under workdir/eval
        seen.append(workdir)
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", "results.json"), "w") as f:
            json.dump({"step": step}, f)
        return {"step": step}

    monkeypatch.setattr(loop.eval_suite, "run_evaluations", fake_suite)
    assert loop.run_evaluations(None, None, None, "mem://bucket/run", 7, None) == {"step": 7}
    assert "://" not in seen[0] and not os.path.exists(seen[0])  # a local temporary folder
    assert json.loads(epath.Path("mem://bucket/run/eval/results.json").read_text()) == {"step": 7}
    assert os.listdir(tmp_path) == []


def test_fields_added_to_the_code_since_the_checkpoint_are_not_refused():
    from configs import demo

    saved = demo.get_config().to_dict()
    del saved["model"]["dtype"]  # a checkpoint from before the field existed
    fixed, knobs = checkpoint_lib.config_changes(saved, demo.get_config())
    assert fixed == [] and knobs == ["model.dtype (new) 'float32'"]


def test_study_files_go_through_epath(mem_scheme, tmp_path, monkeypatch):
    from facemoe_jax import study

    monkeypatch.chdir(tmp_path)
    assert study._read_json("mem://bucket/study/row.json") is None
    epath.Path("mem://bucket/study").mkdir(parents=True, exist_ok=True)
    epath.Path("mem://bucket/study/row.json").write_text('{"fingerprint": "abc"}')
    assert study._read_json("mem://bucket/study/row.json") == {"fingerprint": "abc"}
    study.plot_trade_off({}, "mem://bucket/study/hr_vs_lr.png")
    assert epath.Path("mem://bucket/study/hr_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path) == []


def test_export_to_a_remote_workdir_lands_at_the_url(mem_scheme, tmp_path, monkeypatch):
    import torch
    from configs import common

    from facemoe_jax import encoder
    from facemoe_jax.export import workdir as export_lib
    from tests.export.test_convert import random_variables, tiny_vit_config

    monkeypatch.chdir(tmp_path)
    config = common.get_base_config()
    config.model = tiny_vit_config()
    _, variables = random_variables(config.model)
    seen = []

    def restore(workdir, step=None):  # the checkpoint restore has its own remote tests
        seen.append(workdir)
        return config, variables, 12

    monkeypatch.setattr(encoder, "restore_workdir", restore)
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
