"""Launching real runs from the tests: the tiny float64 config, the `mpc-dist` command, and
the comparison of two runs' final weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mpc_dist.train import compare_runs

BIN = Path(sys.executable).parent
TINY = [
    "model.num_blocks=4", "model.width=16", "model.hidden=24", "data.dataset=synthetic",
    "data.synthetic_size=256", "data.batch_size=32", "data.num_microbatches=4",
    "train.dtype=float64", "train.epochs=1", "train.max_steps=4", "run.progress=false",
    "run.tensorboard=false", "run.plot=false", "pipeline.timeout=20",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def mpc_dist(*args: str, timeout: float = 180, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mpc-dist"), *args], capture_output=True, text=True, timeout=timeout,
        env=env or ENV,
    )  # fmt: skip


def single_process_run(tmp_path: Path, *extra: str) -> Path:
    result = mpc_dist("train", *sets(*TINY, f"run.out_dir={tmp_path}", "run.name=single", *extra))
    assert result.returncode == 0, result.stderr
    return tmp_path / "single"


def assert_same_weights(run_a: Path, run_b: Path, atol: float = 1e-9) -> None:
    differences = compare_runs(run_a, run_b)
    assert max(differences.values()) <= atol, sorted(differences.items(), key=lambda x: -x[1])[:3]
