"""What a first GPU run would hit, checked on the CPU: devices and backends chosen or refused in
one line, every process group with its own timeout, the point-to-point channels opened up front
(docs/gpu.md)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from processes import run

from mpc_dist import devices
from mpc_dist.config import ConfigError, load_config
from mpc_dist.launchers.ray_job import wants_gpus
from mpc_dist.parallel import Groups, Topology, device_and_backend
from mpc_dist.train import validate_config


@pytest.fixture
def two_gpus(monkeypatch):
    """A node that shows two CUDA devices (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


def test_more_ranks_than_gpus_on_a_node_is_refused(two_gpus):
    assert device_and_backend(1) == (torch.device("cuda", 1), "nccl")
    with pytest.raises(ConfigError, match=r"train\.device=auto: local rank 2 has no GPU"):
        device_and_backend(2)


def test_gloo_with_cuda_tensors_is_refused_before_starting(two_gpus):
    two_stages = ["pipeline.stages=2", "model.num_blocks=4", "model.head=aux"]
    for device in ("auto", "cuda"):
        config = load_config(None, [*two_stages, "pipeline.backend=gloo", f"train.device={device}"])
        with pytest.raises(ConfigError, match=r"^pipeline\.backend=gloo: gloo cannot send CUDA"):
            validate_config(config)
    validate_config(load_config(None, [*two_stages, "pipeline.backend=gloo", "train.device=cpu"]))


def test_gpus_torch_cannot_use_are_an_error_not_a_cpu_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "nvidia_gpus", lambda: 8)
    with pytest.raises(ConfigError, match=r"train\.device=auto: 8 NVIDIA GPU\(s\) present"):
        devices.resolve_device("auto")
    assert devices.resolve_device("cpu") == torch.device("cpu")


def test_hidden_gpus_are_not_counted(monkeypatch):
    files = [f"/dev/nvidia{i}" for i in range(4)]
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: files)  # a node with 4 GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.nvidia_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert devices.nvidia_gpus() == 2
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: [])  # DeepSpeed on a CPU node
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert devices.nvidia_gpus() == 0


def test_ray_without_use_gpu_refuses_a_cluster_with_some_gpus():
    assert wants_gpus(None, 8, 8) and not wants_gpus(None, 0, 8)
    assert wants_gpus(True, 0, 8) and not wants_gpus(False, 8, 8)
    with pytest.raises(ConfigError, match=r"^ray\.use_gpu is unset .* 3 GPU\(s\) now for 8"):
        wants_gpus(None, 3, 8)


def test_collective_timeout_is_at_least_the_message_timeout():
    config = load_config(None, ["pipeline.timeout=60", "pipeline.collective_timeout=30"])
    with pytest.raises(ConfigError, match=r"^pipeline\.collective_timeout=30"):
        validate_config(config)


def _timeouts(rank: int, world: int) -> None:
    groups = Groups.create(Topology(world, 1, rank), message_timeout_s=7, collective_timeout_s=99)
    cpu = torch.device("cpu")
    seconds = lambda group: group._get_backend(cpu).options._timeout  # noqa: E731
    assert seconds(groups.messages["F"]) == seconds(groups.messages["B"]) == timedelta(seconds=7)
    assert seconds(groups.pipeline) == timedelta(seconds=99)
    groups.warm_up(cpu)  # every channel opened, in one global order, without a deadlock


def test_every_group_has_its_own_timeout_and_channels_open_up_front():
    run(_timeouts, 3)
