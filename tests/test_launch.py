"""Real launches: torchrun (via `mpc-dist train --nproc`), accelerate launch, hand-started ranks.

Pipeline runs must end with the single-process run's weights; a failing or killed rank must stop
every rank within 60 s with a message naming it; ranks with different configs refuse to start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import (
    BIN,
    ENV,
    TINY,
    assert_same_weights,
    mpc_dist,
    sets,
    single_process_run,
    start_ranks,
    wait_all,
)
from processes import free_port


def test_torchrun_pipeline_matches_single_process(tmp_path):
    extra = ["horizon.horizon=2", "model.head=aux", "pipeline.mode=async"]
    single = single_process_run(tmp_path, *extra)
    result = mpc_dist(
        "train",
        "--nproc",
        "4",
        *sets(
            *TINY,
            *extra,
            "pipeline.stages=2",
            "pipeline.replicas=2",
            f"run.out_dir={tmp_path}",
            "run.name=pipe",
        ),
    )
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
        [
            sys.executable,
            "launch/train.py",
            *sets(*TINY, "pipeline.stages=4", f"run.out_dir={tmp_path}"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 2
    assert "pipeline.stages=4" in result.stderr and "--nproc 4" in result.stderr
    result = mpc_dist("train", "--nproc", "2", *sets(*TINY, "pipeline.stages=4"))
    assert result.returncode == 2 and "--nproc 4" in result.stderr


@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_failed_rank_stops_every_rank_with_its_name(tmp_path, kind):
    args = sets(
        *TINY,
        "pipeline.stages=4",
        "horizon.horizon=2",
        "train.max_steps=50",
        "data.synthetic_size=2048",
        f"run.out_dir={tmp_path}",
    )
    drill = str(Path(__file__).with_name("fault_drill.py"))
    processes = start_ranks(4, lambda rank: [f"2:2:{kind}", *args], script=drill)
    results = wait_all(processes, timeout=180)  # a hang fails here; no wall-clock assertion
    for rank, (code, err) in enumerate(results):
        assert code != 0, f"rank {rank} exited 0"
        if rank != 2:
            assert "rank 2 (stage 2, replica 0)" in err, f"rank {rank}: {err[-2000:]}"
    # every rank that lived to see it wrote its flight record; the line says what each did
    (failure,) = tmp_path.glob("*/failure")
    written = sorted(int(p.stem.removeprefix("rank_")) for p in failure.glob("rank_*.json"))
    assert written == ([0, 1, 2, 3] if kind == "raise" else [0, 1, 3]), written
    line = json.loads((failure / "summary.json").read_text())["failure"]
    assert all(
        f"rank {r}: {'silent, last said: ' if kind == 'kill' and r == 2 else ''}stage {r}" in line
        for r in range(4)
    ), line


def test_ranks_with_different_configs_refuse_to_start(tmp_path):
    def args(rank: int) -> list[str]:
        lr = "optim.lr=0.01" if rank == 1 else "optim.lr=0.001"
        return sets(*TINY, "pipeline.stages=2", lr, f"run.out_dir={tmp_path}")

    results = wait_all(start_ranks(2, args), timeout=180)
    assert all(code != 0 for code, _ in results)
    assert any(
        "rank 1 (stage 1, replica 0) started with a different config" in err for _, err in results
    ), [err[-1500:] for _, err in results]


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
