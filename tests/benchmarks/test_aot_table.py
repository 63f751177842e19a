"""benchmarks/aot_table.py: the docs table rendered from the aot command's JSON reports."""

import json

import pytest

from benchmarks import aot_table

GiB = 2**30


def report(fits: bool, compute_s: float, memory_s: float, at_mfu: float, chips: int = 4) -> dict:
    bound = max(compute_s, memory_s)
    out = {
        "chips": chips,
        "fits": fits,
        "hbm_bytes_per_chip": 95 * GiB,
        "memory_bytes_per_chip": {"total": int(41.94 * GiB)},
        "roofline": {
            "compute_seconds": compute_s,
            "memory_seconds": memory_s,
            "bound_seconds": bound,
            "images_per_second_bound": 1024 / bound,
            "images_per_second_at_mfu": at_mfu,
        },
    }
    if not fits:
        out["fitting_mesh"] = {"data": 2, "expert": 2}
    return out


def write(tmp_path, config, slice_name, r):
    with open(aot_table.cell_path(str(tmp_path), config, slice_name), "w") as f:
        json.dump(r, f)


def test_rows_carry_the_reports_figures_and_mark_missing_cells(tmp_path):
    write(tmp_path, "vit_b_206k", "v5p-8", report(True, 0.051, 0.284, 3000.0))
    write(tmp_path, "vit_b_2m", "v4-8", report(False, 0.2, 0.1, 6000.0, chips=4))
    table = aot_table.render(str(tmp_path)).splitlines()
    assert len(table) == 2 + len(aot_table.CONFIGS) * len(aot_table.SLICES)
    row = next(r for r in table if "205,990" in r and "v5p-8" in r)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # fits, 41.9 of 95 GiB, the 284 ms memory bound: 1024 / 0.284 = 3,606 img/s; 3,000 img/s
    # at 50 % MFU is within it; per chip 901 and 750.
    assert cells[1:] == [
        "v5p-8 (4)",
        "yes",
        "41.9 of 95 GiB",
        "284 ms",
        "memory",
        "3,606",
        "3,000",
        "901 / 750",
    ]
    row = next(r for r in table if "2,000,000" in r and "v4-8" in r)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "**no** (fits at data=2 x expert=2)"
    assert cells[5] == "compute" and cells[7] == "6,000 (beyond the bound)"
    assert sum("not compiled yet" in r for r in table) == len(table) - 2 - 2


def test_a_cell_is_compiled_with_its_configs_overrides_and_kept_once_written(tmp_path):
    command = aot_table.command("vit_b_2m", "v5e-16", "x.json")
    assert command[1:3] == ["-m", "facemoe_jax.aot"]
    assert "--topology=v5e:4x4" in command and "--config=configs/vit_b_moe.py" in command
    assert "--config.data.synthetic_identities=2000000" in command
    assert "--config.model.dtype=bfloat16" in command
    write(tmp_path, "swin_moe_120", "v6e-16", report(True, 0.1, 0.1, 1.0))
    assert aot_table.compile_cell(str(tmp_path), "swin_moe_120", "v6e-16").endswith("kept")


def test_unknown_cells_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        aot_table.main(["--cells", "vit_b_206k@v5p-9"])
    assert "'vit_b_206k@v5p-9'" in capsys.readouterr().err


def test_a_cell_xla_refused_says_so_with_the_bytes_it_asked_for(tmp_path):
    refused = {
        "chips": 4,
        "fits": False,
        "hbm_bytes_per_chip": 32 * GiB,
        "compile_error": "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
        "required for HLO temporaries (17.43G) exceeds available HBM (15.25G).",
        "search": [],
    }
    write(tmp_path, "swin_moe_120", "v4-8", refused)
    row = next(
        r for r in aot_table.render(str(tmp_path)).splitlines() if "Swin" in r and "v4-8" in r
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == [
        "v4-8 (4)",
        "**no**: XLA refused it (temporaries 17.43G per device)",
        "> 32 GiB",
    ]
