"""`ray job submit` against a Ray head started here (`ray start --head`), stopped after."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from launching import BIN, ENV, TINY, sets
from processes import free_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
# Ray 2.60 clusters require a token; `ray start` writes one under ~/.ray, which the job client
# reads in token mode.
RAY_ENV = {**ENV, "RAY_AUTH_MODE": "token"}


@pytest.fixture()
def ray_head():
    dashboard = free_port()
    command = [str(BIN / "ray"), "start", "--head", f"--port={free_port()}", "--num-cpus=2",
               f"--dashboard-port={dashboard}", "--include-dashboard=true",
               "--disable-usage-stats"]  # fmt: skip
    started = subprocess.run(command, capture_output=True, text=True, timeout=120, env=RAY_ENV)
    assert started.returncode == 0, started.stderr[-3000:]
    yield f"http://127.0.0.1:{dashboard}"
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def test_ray_job_submit_runs_a_tiny_config(ray_head, tmp_path):
    command = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head, "--",
        str(BIN / "python"), str(ROOT / "launch" / "ray_train.py"),
        *sets(*TINY, "pipeline.stages=2", f"run.out_dir={tmp_path}", "run.name=job"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=RAY_ENV)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert list((tmp_path / "job" / "checkpoints").glob("step_*"))
    assert '"kind": "eval"' in (tmp_path / "job" / "metrics.jsonl").read_text()
