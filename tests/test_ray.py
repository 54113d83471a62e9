"""Ray Train jobs on a Ray head started here (`ray start --head`, one per module, stopped after):
the same weights as torchrun, `ray job submit`, and a worker killed mid-run that Ray restarts
from the run's own latest complete checkpoint. Every Ray driver runs in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from filelock import FileLock
from launching import BIN, ENV, TINY, assert_same_weights, mpc_dist, sets, single_process_run
from processes import free_port

from mpc_dist.train import ATTEMPTS

# A test's time includes its wait for the other worker's Ray tests (the lock in `ray_head`);
# each driver has its own 300 s limit.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
# Ray 2.60 clusters require a token; `ray start` writes one under ~/.ray, which drivers and the
# job client read in token mode.
RAY_ENV = {**ENV, "RAY_AUTH_MODE": "token"}
# Ray starts its workers at nice 15: next to the suite's other (nice 0) processes on a busy CI
# machine they starve, and a Ray Train controller took minutes to import the package.
HEAD_ENV = {**RAY_ENV, "RAY_worker_niceness": "0"}


def run_driver(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """A Ray driver in a process of its own; a timeout fails with the end of what it printed."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=RAY_ENV)
    except subprocess.TimeoutExpired as e:
        streams = [
            x if isinstance(x, str) else x.decode(errors="replace")
            for x in (e.stdout, e.stderr)
            if x
        ]
        pytest.fail(f"{command[0]} still running after {timeout} s:\n{''.join(streams)[-3000:]}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """One head for the module. `ray stop` ends every Ray instance on the machine, so pytest-xdist
    workers take turns: the lock file is shared by all the workers of this session."""
    with FileLock(tmp_path_factory.getbasetemp().parent / "ray.lock"):
        gcs, dashboard = free_port(), free_port()
        command = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=4",
                   f"--dashboard-port={dashboard}", "--include-dashboard=true",
                   "--disable-usage-stats"]  # fmt: skip
        started = subprocess.run(command, capture_output=True, text=True, timeout=120, env=HEAD_ENV)
        assert started.returncode == 0, started.stderr[-3000:]
        try:
            yield SimpleNamespace(gcs=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dashboard}")
        finally:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def test_ray_job_matches_torchrun(ray_head, tmp_path):
    layout = ["pipeline.stages=2", "pipeline.replicas=2", "horizon.horizon=2", "model.head=aux",
              "pipeline.mode=async", f"run.out_dir={tmp_path}"]  # fmt: skip
    result = mpc_dist("train", "--nproc", "4", *sets(*TINY, *layout, "run.name=torchrun"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_driver([str(BIN / "mpc-dist"), "ray", "--address", ray_head.gcs,
                         *sets(*TINY, *layout, "run.name=ray")])  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "4 (2 stages x 2 replicas, CPU, PACK)" in result.stderr
    assert_same_weights(tmp_path / "torchrun", tmp_path / "ray")
    assert list((tmp_path / "ray").glob("checkpoint_*/pointer.json")), "no checkpoint reported"


def test_ray_job_submit_runs_a_tiny_config(ray_head, tmp_path):
    command = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--",
        str(BIN / "python"), str(ROOT / "launch" / "ray_train.py"),
        *sets(*TINY, "pipeline.stages=2", f"run.out_dir={tmp_path}", "run.name=job"),
    ]  # fmt: skip
    result = run_driver(command)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert list((tmp_path / "job" / "checkpoints").glob("step_*"))
    assert '"kind": "eval"' in (tmp_path / "job" / "metrics.jsonl").read_text()


def test_killed_worker_restarts_from_the_latest_checkpoint(ray_head, tmp_path):
    marker = tmp_path / "killed"
    extra = ["horizon.horizon=2", "train.max_steps=6", "run.checkpoint_every=2"]
    single = single_process_run(tmp_path, *extra)
    overrides = [*TINY, *extra, "pipeline.stages=4", f"run.out_dir={tmp_path}", "run.name=ray"]
    command = [sys.executable, str(ROOT / "tests" / "ray_drill.py"), ray_head.gcs, str(marker)]
    result = run_driver([*command, *overrides])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert marker.exists() and summary["restarts"] == 1
    attempts = [json.loads(x) for x in Path(tmp_path / "ray" / ATTEMPTS).read_text().splitlines()]
    assert attempts[1]["resume_from"].endswith("step_00000002"), attempts
    print(f"restart took {attempts[1]['time'] - float(marker.read_text()):.1f} s")
    assert_same_weights(single, tmp_path / "ray")
