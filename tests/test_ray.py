"""Ray Train jobs on a local Ray instance (one per module): the same weights as torchrun, and a
worker killed mid-run that Ray restarts from the run's own latest complete checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray
from launching import ENV, TINY, assert_same_weights, mpc_dist, sets, single_process_run

from mpc_dist.config import load_config
from mpc_dist.launchers.ray_job import ray_train
from mpc_dist.train import ATTEMPTS, Callback

pytestmark = pytest.mark.ray

RAY_ENV = {**ENV, "RAY_AUTH_MODE": "token"}  # a second driver reads the token Ray wrote


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_job_matches_torchrun(tmp_path):
    layout = ["pipeline.stages=2", "pipeline.replicas=2", "horizon.horizon=2", "model.head=aux",
              "pipeline.mode=async", f"run.out_dir={tmp_path}"]  # fmt: skip
    result = mpc_dist("train", "--nproc", "4", *sets(*TINY, *layout, "run.name=torchrun"))
    assert result.returncode == 0, result.stderr[-3000:]
    address = ray.get_runtime_context().gcs_address  # this module's Ray instance
    result = mpc_dist(
        "ray", "--address", address, *sets(*TINY, *layout, "run.name=ray"), timeout=300, env=RAY_ENV
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "4 (2 stages x 2 replicas, CPU, PACK)" in result.stderr
    assert_same_weights(tmp_path / "torchrun", tmp_path / "ray")
    assert list((tmp_path / "ray").glob("checkpoint_*/pointer.json")), "no checkpoint reported"


def test_killed_worker_restarts_from_the_latest_checkpoint(tmp_path):
    marker = tmp_path / "killed"

    class KillOnce(Callback):  # defined here: Ray pickles it by value to the workers
        def before_step(self, step: int) -> None:
            if step == 4 and int(os.environ["RANK"]) == 1 and not marker.exists():
                marker.write_text(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)

    extra = ["horizon.horizon=2", "train.max_steps=6", "run.checkpoint_every=2"]
    single = single_process_run(tmp_path, *extra)
    config = load_config(
        None, [*TINY, *extra, "pipeline.stages=4", f"run.out_dir={tmp_path}", "run.name=ray"]
    )
    summary = ray_train(config, max_failures=1, callbacks=[KillOnce()])
    assert marker.exists() and summary["restarts"] == 1
    attempts = [json.loads(x) for x in Path(tmp_path / "ray" / ATTEMPTS).read_text().splitlines()]
    assert attempts[1]["resume_from"].endswith("step_00000002"), attempts
    print(f"restart took {attempts[1]['time'] - float(marker.read_text()):.1f} s")
    assert_same_weights(single, tmp_path / "ray")
