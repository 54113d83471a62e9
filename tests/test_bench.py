"""The bubble benchmark's machinery, deterministically: every system runs and is reported, the
outputs are written. Speed and bubble figures are read from the bench itself, not asserted here
(real sleeps on a loaded 2-core machine); the simulator's figures are tested in test_schedule."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_bench_runs_every_system_and_writes_its_report(tmp_path):
    command = [
        str(BIN / "mpc-dist"), "bench", "--stages", "4", "--microbatches", "4,8",
        "--horizons", "1,2", "--rules", "receding", "--modes", "sync,async",
        "--defer-horizons", "2", "--systems", "1f1b,zbv", "--cost-ms", "5", "--steps", "2",
        "--warmup", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    per_m = {m: [r for r in rows if r["microbatches"] == m] for m in ("4", "8")}
    expected = {
        "torch Schedule1F1B", "torch ScheduleZBVZeroBubble", "ours BP-1F1B", "ours BP-1F1B +W",
        "ours BP-GPipe", "ours receding h=1 sync", "ours receding h=1 async",
        "ours receding h=2 sync", "ours receding h=2 sync +W", "ours receding h=2 async",
        "ours receding h=2 async +W",
    }  # fmt: skip
    for m, mine in per_m.items():
        assert {r["configuration"] for r in mine} == expected, m
        for row in mine:  # every one ran, and its memory was counted
            assert float(row["samples_per_s"]) > 0 and float(row["peak_activation_mib_max"]) > 0
            if row["system"] == "ours":
                assert row["simulated_bubble_pct"] != "" and row["overhead_ms_per_F_B_W"]
        best = [r for r in mine if r["system"] == "torch"]
        assert max(float(r["speedup_vs_best_torch"]) for r in best) == 1.0
    markdown = (tmp_path / "bench.md").read_text()
    assert "### m = 4" in markdown and "### m = 8" in markdown
    trace = json.loads((tmp_path / "traces" / "m4_ours_receding_h1_async.json").read_text())
    assert {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"} == {0, 1, 2, 3}
    assert len(list((tmp_path / "gantt").glob("*.png"))) == len(rows)
    for m in (4, 8):
        for plot in (f"horizon_sweep_m{m}.png", f"throughput_vs_memory_m{m}.png"):
            assert (tmp_path / plot).stat().st_size > 10_000
