"""Real launches: torchrun (via `mpc-dist train --nproc`), accelerate launch, hand-started ranks.

Pipeline runs must end with the single-process run's weights; a failing or killed rank must stop
every rank within 60 s with a message naming it; ranks with different configs refuse to start.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import BIN, ENV, TINY, assert_same_weights, mpc_dist, sets, single_process_run
from processes import free_port


def test_torchrun_pipeline_matches_single_process(tmp_path):
    extra = ["horizon.horizon=2", "model.head=aux", "pipeline.mode=async"]
    single = single_process_run(tmp_path, *extra)
    result = mpc_dist(
        "train", "--nproc", "4",
        *sets(*TINY, *extra, "pipeline.stages=2", "pipeline.replicas=2",
              f"run.out_dir={tmp_path}", "run.name=pipe"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage_busy_s" in (tmp_path / "pipe" / "metrics.jsonl").read_text()
    assert_same_weights(single, tmp_path / "pipe")


def test_accelerate_launch_pipeline_matches_single_process(tmp_path):
    extra = ["horizon.horizon=2"]
    single = single_process_run(tmp_path, *extra)
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "4",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "launch/train.py",
        *sets(*TINY, *extra, "pipeline.stages=4", f"run.out_dir={tmp_path}", "run.name=acc"),
    ]  # fmt: skip
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(single, tmp_path / "acc")


def test_world_size_mismatch_is_a_clear_error(tmp_path):
    # A plain `python launch/train.py` of a 4-stage config: no launcher, one process.
    result = subprocess.run(
        [sys.executable, "launch/train.py", *sets(*TINY, "pipeline.stages=4",
                                                  f"run.out_dir={tmp_path}")],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert result.returncode == 2
    assert "pipeline.stages=4" in result.stderr and "--nproc 4" in result.stderr
    result = mpc_dist("train", "--nproc", "2", *sets(*TINY, "pipeline.stages=4"))
    assert result.returncode == 2 and "--nproc 4" in result.stderr


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
            )  # fmt: skip
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


@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_failed_rank_stops_every_rank_with_its_name(tmp_path, kind):
    args = sets(*TINY, "pipeline.stages=4", "horizon.horizon=2", "train.max_steps=50",
                "data.synthetic_size=2048", f"run.out_dir={tmp_path}")  # fmt: skip
    drill = str(Path(__file__).with_name("fault_drill.py"))
    processes = start_ranks(4, lambda rank: [f"2:2:{kind}", *args], script=drill)
    results = wait_all(processes, timeout=90)  # a hang fails here; no wall-clock assertion
    for rank, (code, err) in enumerate(results):
        assert code != 0, f"rank {rank} exited 0"
        if rank != 2:
            assert "rank 2 (stage 2, replica 0)" in err, f"rank {rank}: {err[-2000:]}"


def test_ranks_with_different_configs_refuse_to_start(tmp_path):
    def args(rank: int) -> list[str]:
        lr = "optim.lr=0.01" if rank == 1 else "optim.lr=0.001"
        return sets(*TINY, "pipeline.stages=2", lr, f"run.out_dir={tmp_path}")

    results = wait_all(start_ranks(2, args), timeout=90)
    assert all(code != 0 for code, _ in results)
    assert any("rank 1 (stage 1, replica 0) started with a different config" in err
               for _, err in results), [err[-1500:] for _, err in results]  # fmt: skip


def test_checkpoint_from_two_stages_resumes_on_four(tmp_path):
    """Checkpoints are keyed by parameter name: a 2-stage run continues on 4 stages."""
    extra = ["horizon.horizon=2", "train.max_steps=6"]
    single = single_process_run(tmp_path, *extra)
    common = [*TINY, *extra, f"run.out_dir={tmp_path}", "run.name=moved"]
    first = mpc_dist(
        "train", "--nproc", "2", *sets(*common, "pipeline.stages=2", "train.max_steps=3")
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = mpc_dist("train", "--nproc", "4", "--resume", *sets(*common, "pipeline.stages=4"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_weights(single, tmp_path / "moved")


def test_single_process_config_under_a_multi_process_launcher_is_refused(tmp_path):
    results = wait_all(start_ranks(2, lambda rank: sets(*TINY, f"run.out_dir={tmp_path}")), 90)
    for code, err in results:
        assert code == 2 and "launcher started 2 processes" in err, err[-1500:]


def test_deepspeed_launcher_pipeline_matches_single_process(tmp_path):
    """`deepspeed --num_gpus N` hosts the store in rank 0 and passes --local_rank."""
    single = single_process_run(tmp_path)
    command = [
        str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        "launch/train.py",
        *sets(*TINY, "pipeline.stages=2", f"run.out_dir={tmp_path}", "run.name=ds"),
    ]  # fmt: skip
    env = {**ENV, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(single, tmp_path / "ds")
