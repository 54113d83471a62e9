"""Choosing the horizon: the theory check on deep linear nets, the fitted laws, the probe, the
selection and `horizon.horizon: auto`."""

from __future__ import annotations

import json
import math
import subprocess
from itertools import pairwise

import pytest
import torch
from launching import BIN, ENV, TINY, sets
from torch import nn

from mpc_dist.config import ConfigError, load_config
from mpc_dist.horizon import choose, fit_alignment, fit_linear, probe
from mpc_dist.models import pipeline_model
from mpc_dist.models.mlp import LinearResidual
from mpc_dist.train import train


def deep_linear(T: int, smooth: bool, width: int = 8, samples: int = 256, scale: float = 0.1):
    """W(t) = I + W~(t)/T with W~(t) a fixed smooth function of t/T, or drawn per block; whitened
    inputs; the same squared loss at every state (an identity head)."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (scale * torch.randn(width, width, generator=g, dtype=torch.float64) for _ in "abc")
    blocks = []
    for t in range(T):
        block = LinearResidual(width, 1.0 / T).double()
        w = (
            a * math.cos(math.pi * t / T) + b * math.sin(math.pi * t / T) + c
            if smooth
            else scale * torch.randn(width, width, generator=g, dtype=torch.float64)
        )
        with torch.no_grad():
            block.linear.weight.copy_(w)
        blocks.append(block)
    model = pipeline_model(nn.Identity(), blocks, nn.Identity(), (width,))
    q, _ = torch.linalg.qr(torch.randn(samples, width, generator=g, dtype=torch.float64))
    x = q * math.sqrt(samples)  # x^T x / n = I
    y = x @ torch.randn(width, width, generator=g, dtype=torch.float64)
    return model, [(x, y)]


def squared(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum(-1).mean()


def misalignment_slope(T: int, smooth: bool) -> tuple[float, list[float]]:
    model, batches = deep_linear(T, smooth)
    rows = probe(model, batches, list(range(T // 2, T, T // 16)), ("receding",), squared)
    law = fit_alignment([r.horizon for r in rows], [r.misalignment for r in rows], T)
    return law.p, [r.misalignment for r in rows]


def test_deep_linear_misalignment_falls_with_h_cubically_when_depth_is_continuous():
    """The paper's 1 - cos^2 ~ c (1 - h/T)^3 is the continuous-depth regime: with W~(t) smooth
    in t/T the log-log slope over h in [T/2, T) is near 3 and rises with T; with W~(t) drawn per
    block the errors add like a random walk and the slope is near 2 (docs/horizon-study.md)."""
    smooth_64, falling = misalignment_slope(64, smooth=True)
    assert all(a > b for a, b in pairwise(falling)), "1 - cos^2 falls as h grows"
    assert 2.5 <= smooth_64 <= 3.5, smooth_64
    smooth_128, _ = misalignment_slope(128, smooth=True)
    assert smooth_128 > smooth_64
    independent_64, falling = misalignment_slope(64, smooth=False)
    assert all(a > b for a, b in pairwise(falling))
    assert 1.5 <= independent_64 <= 2.5, independent_64


def test_fits_recover_their_laws():
    T = 32
    hs = [1, 2, 4, 8, 16, 24, 28]
    law = fit_alignment(hs, [0.3 * (1 - h / T) ** 2.4 for h in hs], T)
    assert law.c == pytest.approx(0.3) and law.p == pytest.approx(2.4) and law.r2 > 0.999
    assert law.alignment(T, T) == 1.0
    memory = fit_linear([1, 2, 4, 8], [3 * h + 5 for h in (1, 2, 4, 8)])
    assert memory.slope == pytest.approx(3) and memory.intercept == pytest.approx(5)


def selection_run(tmp_path, *extra: str):
    config = load_config(
        None,
        [
            *TINY,
            "model.head=aux",
            "horizon.horizon=auto",
            "horizon.progress_steps=5",
            "horizon.probe_batches=2",
            f"run.out_dir={tmp_path}",
            *extra,
        ],
    )
    return config


def test_select_horizon_objectives_and_their_constraints(tmp_path):
    from mpc_dist.train import open_run
    from mpc_dist.train.selection import select_horizon, starting_model

    config = selection_run(tmp_path, "train.dtype=float32")
    meta, source, _ = open_run(config)
    plan, selection = select_horizon(config, starting_model(config, meta), source)
    candidates = selection.candidates
    assert {(c.rule, c.horizon) for c in candidates} == {
        ("receding", 1),
        ("receding", 2),
        ("receding", 4),
        ("shrinking", 2),
    }
    bp = next(c for c in candidates if c.horizon == 4)
    assert bp.cos2 == pytest.approx(1.0) and bp.progress == pytest.approx(1.0)
    assert (plan.rule, plan.horizon) == (selection.choice.rule, selection.choice.horizon)
    budget = sorted(c.memory_mib for c in candidates)[1]
    choice, reason = choose(candidates, "memory", memory_budget_mib=budget)
    assert choice.memory_mib <= budget and "MiB" in reason
    with pytest.raises(ConfigError, match=r"smallest feasible budget here is \d"):
        choose(candidates, "memory", memory_budget_mib=min(c.memory_mib for c in candidates) / 2)
    fast, _ = choose(candidates, "speed", min_alignment=0.0)
    assert fast.step_ms == min(c.step_ms for c in candidates)
    with pytest.raises(ConfigError, match="largest feasible value"):
        choose(candidates, "speed", min_alignment=1.5)
    strict = sorted(c.progress for c in candidates)[-2]  # progress must hold too
    held, reason = choose(candidates, "speed", min_progress=strict)
    assert held.progress >= strict and "progress" in reason
    assert held.step_ms == min(c.step_ms for c in candidates if c.progress >= strict)


def test_horizon_auto_in_one_process_and_in_a_pipeline(tmp_path):
    config = selection_run(tmp_path, "run.name=one", "train.dtype=float32")
    summary = train(config)
    record = json.loads((tmp_path / "one" / "horizon_selection.jsonl").read_text().splitlines()[0])
    assert record["choice"]["horizon"] in (1, 2, 4) and summary["plan"].startswith(
        f"{record['choice']['rule']} h={record['choice']['horizon']}"
    )
    longer = selection_run(tmp_path, "run.name=one", "train.dtype=float32", "train.max_steps=6")
    resumed = train(longer, resume=True)  # takes the run's choice, measures nothing again
    assert resumed["plan"] == summary["plan"]
    assert len((tmp_path / "one" / "horizon_selection.jsonl").read_text().splitlines()) == 1
    result = subprocess.run(
        [
            str(BIN / "mpc-dist"),
            "train",
            "--nproc",
            "2",
            *sets(
                *TINY,
                "model.head=aux",
                "horizon.horizon=auto",
                "horizon.progress_steps=5",
                "horizon.probe_batches=2",
                "pipeline.stages=2",
                f"run.out_dir={tmp_path}",
                "run.name=pipe",
                "train.dtype=float32",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chosen:" in result.stderr
    assert (tmp_path / "pipe" / "horizon_selection.jsonl").exists()


def test_an_infeasible_budget_is_a_one_line_error_before_training(tmp_path):
    result = subprocess.run(
        [
            str(BIN / "mpc-dist"),
            "train",
            *sets(
                *TINY,
                "model.head=aux",
                "horizon.horizon=auto",
                "horizon.objective=memory",
                "horizon.memory_budget_mib=0.0001",
                "horizon.progress_steps=0",
                f"run.out_dir={tmp_path}",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "horizon.memory_budget_mib=0.0001" in last and "smallest feasible budget" in last


def test_probe_over_a_runs_checkpoints(tmp_path):
    run = [*TINY, "train.max_steps=4", "run.checkpoint_every=2", f"run.out_dir={tmp_path}",
           "run.name=r", "train.dtype=float32", "horizon.horizon=2"]  # fmt: skip
    assert (
        subprocess.run(
            [str(BIN / "mpc-dist"), "train", *sets(*run)], env=ENV, capture_output=True, timeout=120
        ).returncode
        == 0
    )
    out = tmp_path / "probe"
    result = subprocess.run(
        [
            str(BIN / "mpc-dist"),
            "probe",
            *sets(*run),
            "--run",
            str(tmp_path / "r"),
            "--batches",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "probe.json").read_text())
    assert {r["step"] for r in rows} == {2, 4}  # both kept checkpoints
    assert {(r["rule"], r["horizon"]) for r in rows} == {
        ("receding", 1),
        ("receding", 2),
        ("receding", 4),
        ("shrinking", 2),
    }
    assert all(abs(r["cos"]) <= 1 for r in rows)
    assert (out / "probe.png").stat().st_size > 10_000


@pytest.mark.slow
def test_horizon_study_at_a_small_size_and_read_back(tmp_path):
    """`mpc-dist horizon-study` end to end at a few steps: every setting trained and summarised,
    the selector compared per objective, the plots drawn; a second call trains and measures
    nothing, and reports the same."""
    command = [str(BIN / "mpc-dist"), "horizon-study", "--models", "mlp8", "--datasets", "mnist",
               "--seeds", "1", "--max-steps", "4", "--eval-every", "2", "--progress-steps", "8",
               "--workers", "2", "--no-puzzle", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    settings = {(r["rule"], r["horizon"]) for r in report["rows"]}
    assert settings == {
        ("receding", 1),
        ("receding", 2),
        ("receding", 4),
        ("receding", 8),
        ("shrinking", 2),
        ("shrinking", 4),
    }
    assert len(report["runs"]) == 6 and all(len(r["evals"]) == 2 for r in report["runs"])
    bp = next(r for r in report["rows"] if r["horizon"] == 8)
    local = next(r for r in report["rows"] if r["horizon"] == 1)
    assert bp["speed_vs_bp"] == 1 and local["speed_vs_bp"] > 1.5  # no backward between stages
    assert local["peak_mib"] < bp["peak_mib"] / 2
    assert [s["objective"] for s in report["selections"]] == ["memory", "speed", "tradeoff"]
    assert all(s["chosen"] for s in report["selections"])
    for plot in ("accuracy_memory", "time_to_accuracy"):
        assert (tmp_path / f"{plot}_mlp8_mnist.png").stat().st_size > 10_000
    written = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/metrics.jsonl")}
    assert len(written) == 6
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in written} == written  # read back, not retrained
    reread = json.loads((tmp_path / "results.json").read_text())  # measurements read back too
    assert (reread["rows"], reread["selections"]) == (report["rows"], report["selections"])
