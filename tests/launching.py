"""Launching real runs from the tests: the tiny float64 config, the `mpc-dist` command, ranks
started by hand, and the comparison of two runs' final weights."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import free_port

from mpc_dist import cli
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
        [str(BIN / "mpc-dist"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
    )


def single_process_run(tmp_path: Path, *extra: str) -> Path:
    """The reference run, in this process: `mpc-dist train` in a process of its own would spend
    about 5 s of CPU importing what this one has imported already."""
    assert (
        cli.main(["train", *sets(*TINY, f"run.out_dir={tmp_path}", "run.name=single", *extra)]) == 0
    )
    return tmp_path / "single"


def assert_same_weights(run_a: Path, run_b: Path, atol: float = 1e-9) -> None:
    differences = compare_runs(run_a, run_b)
    assert max(differences.values()) <= atol, sorted(differences.items(), key=lambda x: -x[1])[:3]


def start_ranks(
    world: int, args_of_rank, env_extra=None, script: str = "launch/train.py"
) -> list[subprocess.Popen]:
    """Ranks started by hand, the way a cluster scheduler would start them."""
    port = free_port()
    processes = []
    for rank in range(world):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), **(env_extra or {})}  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, script, *args_of_rank(rank)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def wait_all(processes, timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    results = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"ranks still running after {timeout} s: a hang")
        results.append((process.returncode, err))
    return results
