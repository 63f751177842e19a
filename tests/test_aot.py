"""The AOT report (facemoe_jax/aot/): its arithmetic by hand, and, where libtpu is at hand
($FACEMOE_LIBTPU_DIR or installed), the demo config compiled for a 4-chip TPU v5e topology."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, demo, swin_moe_120
from facemoe_jax.aot import compile as aot_compile
from facemoe_jax.aot import cost, topology
from facemoe_jax.aot import report as aot_report
from facemoe_jax.models import build_model
from facemoe_jax.parallel import mesh as mesh_lib
from facemoe_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_roofline_is_the_slower_of_compute_and_memory():
    r = cost.roofline(2e12, 1e9, peak_flops=1e15, bandwidth=1e12, global_batch=512, mfu=0.5)
    assert r.compute_seconds == pytest.approx(2e-3) and r.memory_seconds == pytest.approx(1e-3)
    assert r.bound_seconds == pytest.approx(2e-3)
    assert r.images_per_second_bound == pytest.approx(512 / 2e-3)
    # At 50 % MFU a chip runs 5e14 FLOP/s: 2e12 FLOPs per step take 4 ms for 512 images.
    assert r.images_per_second_at_mfu == pytest.approx(512 / 4e-3)
    memory_bound = cost.roofline(1e9, 4e9, peak_flops=1e15, bandwidth=1e12, global_batch=8)
    assert memory_bound.bound_seconds == pytest.approx(4e-3)


def test_mesh_candidates_split_the_devices_as_the_experts_allow():
    assert cost.mesh_candidates(8, 8, dense=False) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert cost.mesh_candidates(16, 8, dense=False) == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    assert cost.mesh_candidates(6, 4, dense=False) == [(3, 2), (6, 1)]
    assert cost.mesh_candidates(4, 3, dense=False) == [(4, 1)]
    assert cost.mesh_candidates(8, 8, dense=True) == [(8, 1)]


def test_dropless_expert_flops_by_hand():
    vit = common.get_base_config().model
    vit.update(image_size=112, patch_size=9, width=512, depth=24, mlp_ratio=4.0)
    vit.update(moe_layers="every:2", top_k=2, capacity_factor=0.0)
    # 144 tokens, 12 MoE blocks, 2 experts per token, two 512x2048 matmuls of 2 FLOPs per MAC,
    # forward + backward = 3 forwards.
    per_image = 3 * 12 * 144 * 2 * (2 * 512 * 2048 * 2)
    assert cost.dropless_expert_flops(vit, 16) == pytest.approx(16 * per_image)
    vit.capacity_factor = 1.5  # the capacity path's einsums are in XLA's count
    assert cost.dropless_expert_flops(vit, 16) == 0.0
    swin = swin_moe_120.get_config().model
    # 120 / 6 = 20 patches a side: stages of 20, 10, 5 tokens a side, widths 384, 768, 1536.
    tokens_width = [(400, 384)] * 2 + [(100, 768)] * 18 + [(25, 1536)] * 2
    forward = sum(t * 2 * 4 * w * 4 * w for t, w in tokens_width)
    assert cost.dropless_expert_flops(swin, 2) == pytest.approx(3 * 2 * forward)
    swin.moe_layers = "none"
    assert cost.dropless_expert_flops(swin, 2) == 0.0


def test_state_bytes_split_centres_experts_and_the_rest():
    config = demo.get_config()
    config.data.num_classes = 100
    mesh = mesh_lib.make_mesh(config.mesh)
    _, _, _, state, _ = aot_compile.abstract_sharded_state(config, mesh)
    split = cost.state_bytes_by_kind(state)
    model = build_model(config.model)
    params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)), train=False)
    )["params"]
    encoder_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    rows = state.params["classifier"]["centers"].shape[0]
    assert split["params"]["centres"] == rows * config.model.embed_dim * 4
    assert split["params"]["experts"] + split["params"]["rest"] == encoder_bytes
    assert split["params"]["experts"] > 0
    # AdamW: two moments per parameter (plus a step count in the rest).
    assert split["optimizer"]["centres"] == 2 * split["params"]["centres"]
    assert split["optimizer"]["experts"] == 2 * split["params"]["experts"]
    assert state_lib.count_params(state.params["encoder"]) * 4 == encoder_bytes


def test_without_libtpu_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.delenv(topology.LIBTPU_DIR_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(topology.AotError, match=r"tpu-aot.*FACEMOE_LIBTPU_DIR"):
        topology.use_libtpu()
    monkeypatch.setenv(topology.LIBTPU_DIR_ENV, "/nonexistent/libtpu_dir")
    with pytest.raises(topology.AotError, match="/nonexistent/libtpu_dir holds no libtpu"):
        topology.use_libtpu()


def test_the_printed_report_names_the_verdict_and_a_fitting_mesh():
    gib = 2**30
    kinds = {"centres": 2 * gib, "experts": gib, "rest": gib // 2}
    memory = {"arguments": 9 * gib, "outputs": 9 * gib, "aliased": 9 * gib, "temporaries": gib}
    roof = {"compute_seconds": 0.2, "memory_seconds": 0.1, "bound_seconds": 0.2}
    roof.update(images_per_second_bound=5120.0, images_per_second_at_mfu=2560.0)
    report = {
        "config": {"model": "vit_moe", "classes": 2_000_000, "batch": 1024, "dtype": "bfloat16"},
        "topology": "v5e:2x2",
        "chip": {
            "name": "TPU v5e",
            "peak_bf16_flops": 197e12,
            "hbm_bytes_per_second": 819e9,
            "source": "data sheet",
        },
        "chips": 4,
        "devices_per_chip": 1,
        "mesh": {"data": 4, "expert": 1},
        "compile_seconds": 12.0,
        "state_bytes_per_chip": {"params": kinds, "optimizer": kinds},
        "memory_bytes_per_chip": {**memory, "code": 0, "total": 20 * gib},
        "hbm_bytes_per_chip": 16 * gib,
        "fits": False,
        "flops_per_chip_xla": 3e13,
        "flops_per_chip": 4e13,
        "dropless_expert_flops_added_per_chip": 1e13,
        "hbm_bytes_accessed_per_chip": 8 * gib,
        "arithmetic_intensity": 4660.0,
        "roofline": roof,
        "mfu_for_throughput": 0.5,
        "embed": {
            "batch": 1024,
            "flops_per_chip": 1e12,
            "memory_bytes_per_chip": {"total": gib},
            "roofline": roof,
        },
        "search": [
            {"mesh": (2, 2), "total_bytes_per_chip": 17 * gib},
            {"mesh": (1, 4), "total_bytes_per_chip": 15 * gib},
        ],
        "fitting_mesh": {"data": 1, "expert": 4},
    }
    text = aot_report.format_report(report)
    assert "total        20.00 GiB of 16.00 GiB: DOES NOT FIT" in text
    assert "parameters   centres 2.00 GiB, experts 1.00 GiB, rest 512.0 MiB" in text
    assert "(XLA 30.000 T + dropless experts 10.000 T)" in text
    assert "mesh data=2 x expert=2: 17.00 GiB" in text
    assert text.endswith("fits with --config.mesh.data=1 --config.mesh.expert=4")
    assert "2,560 images/s at 50% MFU" in text


def libtpu_dir():
    """$FACEMOE_LIBTPU_DIR, or "" when libtpu is installed here; None when neither."""
    folder = os.environ.get(topology.LIBTPU_DIR_ENV, "")
    if folder and os.path.isdir(os.path.join(folder, "libtpu")):
        return folder
    return "" if importlib.util.find_spec("libtpu") is not None else None


needs_libtpu = pytest.mark.skipif(
    libtpu_dir() is None,
    reason="libtpu is not installed and $FACEMOE_LIBTPU_DIR is not set (pip install --target "
    "DIR libtpu==0.0.42.1; .ci/run does this)",
)


@pytest.mark.slow
@needs_libtpu
def test_demo_compiles_for_a_tpu_v5e_topology_quietly(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, FACEMOE_LIBTPU_DIR=libtpu_dir())
    env.pop("JAX_PLATFORMS", None)  # the command sets its own
    command = [sys.executable, "-m", "facemoe_jax.aot", "--config", "configs/demo.py"]
    command += ["--topology", "v5e:2x2", "--json", str(out), "--config.train.batch_size=64"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip() == ""  # libtpu's start-up lines are held back
    report = json.loads(out.read_text())
    assert report["chips"] == 4 and report["chip"]["name"] == "TPU v5e"
    assert report["mesh"] == {"data": 4, "expert": 1} and report["fits"]
    memory = report["memory_bytes_per_chip"]
    assert 0 < memory["total"] < report["hbm_bytes_per_chip"]
    # The donated state comes back in place: every output byte but the metrics is aliased.
    assert memory["aliased"] > 0.9 * memory["outputs"]
    # The parameters of the demo (0.40M encoder + 1000 x 128 centres, float32), per chip: the
    # centres split over the 4 chips, the rest replicated.
    params = report["state_bytes_per_chip"]["params"]
    assert 1000 * 128 * 4 <= 4 * params["centres"] < 1100 * 128 * 4
    assert 0.3e6 * 4 < params["experts"] + params["rest"] < 0.5e6 * 4
    # The capacity path: XLA counts every FLOP; about 6.6 GFLOP per step of 128 on one CPU
    # device, so a quarter of half of it per chip.
    assert report["dropless_expert_flops_added_per_chip"] == 0.0
    assert 0.5e9 < report["flops_per_chip"] < 1.2e9
    roof = report["roofline"]
    peak, bandwidth = 197e12, 819e9
    assert roof["compute_seconds"] == pytest.approx(report["flops_per_chip"] / peak)
    assert roof["memory_seconds"] == pytest.approx(
        report["hbm_bytes_accessed_per_chip"] / bandwidth
    )
    assert roof["bound_seconds"] == max(roof["compute_seconds"], roof["memory_seconds"])
    assert report["embed"]["batch"] == 64 and report["embed"]["flops_per_chip"] > 0
    assert "fits" in done.stdout and "images/s at 50% MFU" in done.stdout
    np.testing.assert_allclose(
        report["arithmetic_intensity"],
        report["flops_per_chip"] / report["hbm_bytes_accessed_per_chip"],
    )


@needs_libtpu
def test_an_unknown_topology_is_one_line(tmp_path):
    env = dict(os.environ, FACEMOE_LIBTPU_DIR=libtpu_dir())
    command = [sys.executable, "-m", "facemoe_jax.aot", "--config", "configs/demo.py"]
    command += ["--topology", "v5e-pod"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --topology=v5e-pod:"), done.stderr


def test_missing_flags_and_a_missing_libtpu_are_one_line_each(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != topology.LIBTPU_DIR_ENV}
    command = [sys.executable, "-m", "facemoe_jax.aot", "--config", "configs/demo.py"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: both --config and --topology are required"
    env[topology.LIBTPU_DIR_ENV] = str(tmp_path)  # a folder without libtpu
    done = subprocess.run(
        command + ["--topology", "v5e:2x2"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {topology.LIBTPU_DIR_ENV}={tmp_path} holds no libtpu package"
    )


OOM = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (17.43G) exceeds available HBM (15.25G)."
)


def test_out_of_memory_is_read_from_xlas_refusal_only():
    error = jax.errors.JaxRuntimeError(f"some prefix\n{OOM}\nmore")
    assert cost.out_of_memory(error).startswith("RESOURCE_EXHAUSTED: Ran out of memory on HBM")
    assert "(17.43G)" in cost.out_of_memory(error)
    assert cost.out_of_memory(ValueError("shapes do not match")) is None
    assert cost.out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: too many threads")) is None


def test_a_program_xla_refuses_for_memory_is_a_does_not_fit_verdict(monkeypatch):
    """What the Swin-MoE on v4-8 met: the TPU compiler refuses a program larger than a device's
    HBM. The report says it does not fit, with the state it would hold, and searches on."""
    from facemoe_jax.parallel import chips

    from .conftest import tiny_config

    config = tiny_config()
    config.data.num_classes = 64
    config.train.batch_size = 8
    chip = chips.Chip("TPU test", 1e14, 16 * 2**30, 1e12, "test")
    monkeypatch.setattr(aot_report, "topology_devices", lambda name: jax.devices()[:1])
    monkeypatch.setattr(chips, "chip_of", lambda kind: chip)
    calls = []

    def refuse(candidate, mesh, batch_size=0):
        calls.append(dict(candidate.mesh))
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(aot_report, "compile_train_step", refuse)
    r = aot_report.report(config, "test:1x1")
    assert r["fits"] is False and r["compile_error"].startswith("RESOURCE_EXHAUSTED")
    assert r["state_bytes_per_chip"]["params"]["experts"] > 0
    assert "fitting_mesh" not in r and len(calls) == 1 + len(r["search"])
    text = aot_report.format_report(r)
    assert "train step not compiled" in text
    assert "XLA refused the program: RESOURCE_EXHAUSTED" in text
    assert "more than 16.00 GiB: DOES NOT FIT" in text
    assert text.endswith("must divide 4 experts): more chips or a smaller batch")

    def other_error(candidate, mesh, batch_size=0):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(aot_report, "compile_train_step", other_error)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        aot_report.report(config, "test:1x1")
