"""`mpc-dist doctor`: passes on this machine for one process and for 4 ranks under torchrun,
fails in one line naming the fix for a layout this machine cannot run; its checks with the
conditions faked (GPUs, /dev/shm, a run directory that is not shared)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from launching import mpc_dist, sets
from processes import run

from mpc_dist.config import load_config
from mpc_dist.train import doctor
from mpc_dist.train.bootstrap import check_shared_directory
from mpc_dist.train.doctor import Place


def test_doctor_passes_for_the_quickstart(tmp_path):
    result = mpc_dist(
        "doctor", "--config", "configs/quickstart.yaml", *sets(f"run.out_dir={tmp_path}")
    )
    assert result.returncode == 0, result.stderr
    for check in ("torch / CUDA / cuDNN / NCCL", "device", "/dev/shm", "memory", "run directory"):
        assert check in result.stdout, check
    assert "nothing blocks this run" in result.stderr
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_doctor_passes_for_four_ranks_under_torchrun(tmp_path):
    result = mpc_dist(
        "doctor",
        "--config",
        "configs/mnist_4stage.yaml",
        "--nproc",
        "4",
        *sets(f"run.out_dir={tmp_path}"),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "4 of 4 rank(s)" in result.stdout
    assert "shared by all 4 ranks" in result.stdout
    assert "nothing blocks this run" in result.stderr


def test_doctor_fails_in_one_line_for_cuda_on_this_machine(tmp_path):
    result = mpc_dist(
        "doctor",
        "--config",
        "configs/quickstart.yaml",
        *sets("train.device=cuda", f"run.out_dir={tmp_path}"),
    )
    assert result.returncode == 1
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("mpc-dist")]
    assert line.startswith("mpc-dist doctor: FAIL device"), line
    assert "train.device=cuda" in line and "train.device=auto" in line, line


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H100")


def test_more_ranks_on_a_node_than_gpus_blocks_the_run(monkeypatch):
    config = load_config("configs/mnist_4stage.yaml", ["train.device=cuda"])
    fake_gpus(monkeypatch, 2)
    device, (check,) = doctor.device_check(config, Place(3, 4, 3, "n1", 4, 1))
    assert check.status == "fail" and "4 rank(s) on node n1 but 2 GPU(s)" in check.result
    assert "at most 2 ranks per node" in check.fix
    device, (check,) = doctor.device_check(config, Place(1, 4, 1, "n1", 2, 2))
    assert check.status == "ok" and device == torch.device("cuda", 1), check
    gloo = load_config("configs/mnist_4stage.yaml", ["pipeline.backend=gloo"])
    _, checks = doctor.device_check(gloo, Place(1, 4, 1, "n1", 2, 2))
    assert [c.status for c in checks] == ["ok", "fail"] and "gloo" in checks[1].fix


def test_gpus_torch_cannot_use_block_the_run(monkeypatch):
    config = load_config("configs/quickstart.yaml")
    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(doctor, "gpus_present", lambda: 8)
    _, (check,) = doctor.device_check(config, Place(0, 1, 0, "n1", 1, 1))
    assert check.status == "fail" and "8 GPU(s)" in check.result and "wheel" in check.fix


def test_a_small_dev_shm_blocks_gpu_ranks_sharing_a_node(monkeypatch):
    small = SimpleNamespace(f_frsize=4096, f_blocks=64 * 2**20 // 4096)  # docker's 64 MB
    monkeypatch.setattr(os, "statvfs", lambda path: small)
    cuda = torch.device("cuda", 0)
    assert doctor.shm_check(Place(0, 2, 0, "n1", 2, 1), cuda).status == "fail"
    assert doctor.shm_check(Place(0, 2, 0, "n1", 1, 2), cuda).status == "warn"  # alone there
    assert doctor.shm_check(Place(0, 1, 0, "n1", 1, 1), torch.device("cpu")).status == "warn"


def check_shared(rank: int, world: int, base: str) -> None:
    shared = f"{base}/shared"
    assert doctor.shared_directory_misses(shared) == []
    own = f"{base}/node{rank}"  # what each node sees when the directory is not shared
    assert doctor.shared_directory_misses(own) == [1]
    try:
        check_shared_directory(own)
    except Exception as error:
        assert "run.out_dir" in str(error) and "rank(s) 1 cannot read" in str(error)
    else:
        raise AssertionError("a directory each rank sees differently passed")


def test_the_run_directory_must_be_one_filesystem_for_every_rank(tmp_path):
    run(check_shared, 2, str(tmp_path), timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node0", "shared"]
    assert not any((tmp_path / "node0").iterdir()) and not any((tmp_path / "shared").iterdir())
