"""Joining a launcher's job: the process group, this rank's place and device, the watchdog, and
agreeing on what rank 0 decides (the plan under ``horizon: auto``, a timed partition)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from ..parallel import (
    Topology,
    Watchdog,
    check_same_config,
    device_and_backend,
    init_process_group,
    job_token,
    launched_world_size,
    place_ranks,
    process_group_timeout,
    shares_agent_store_across_restarts,
)
from .attempts import FAILURE

T = TypeVar("T")


@dataclass
class Job:
    """This rank in a P x D job: where it sits, its device, and the watchdog that stops every
    rank when one fails."""

    topology: Topology
    device: torch.device
    watchdog: Watchdog

    @property
    def is_rank_zero(self) -> bool:
        return self.topology.rank == 0

    def from_rank_zero(self, compute: Callable[[], T], timeout_s: float | None = None) -> T:
        """What rank 0 computes, on every rank. With ``timeout_s`` the others wait that long on
        a group of their own (a long measurement; the watchdog keeps beating meanwhile)."""
        group = None
        if timeout_s is not None:
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        value = [compute() if self.is_rank_zero else None]
        dist.broadcast_object_list(value, src=0, group=group)
        if group is not None:
            dist.destroy_process_group(group)
        return value[0]


def join_job(config: Config) -> Job:
    """Join the launcher's job, place this rank, start the watchdog, check that every rank was
    started with the same config."""
    p = config.pipeline
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device, backend = device_and_backend(local_rank, p.backend, config.train.device)
    init_process_group(backend, process_group_timeout(p.timeout))
    topology = place_ranks(p.stages, p.replicas)
    several_agents = int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1
    if shares_agent_store_across_restarts() and several_agents and topology.rank == 0:
        print("mpc-dist: warning: torchrun's restarts on several nodes share its store "
              "between attempts (pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
              "where torchrun starts", file=sys.stderr)  # fmt: skip
    failures, namespace = config.run_dir / FAILURE, job_token()
    watchdog = Watchdog(topology, p.timeout, failure_dir=failures, namespace=namespace).start()
    try:
        check_same_config(config.to_yaml(), topology)
    except BaseException as error:
        watchdog.fail(error)
        raise
    return Job(topology, device, watchdog)


def _launch_hint(config: Config) -> str:
    n = config.world_size
    return (
        f"run `mpc-dist train --nproc {n} ...`, `torchrun --nproc-per-node {n} launch/train.py "
        f"...`, or `accelerate launch --multi_gpu --num_processes {n} launch/train.py ...` "
        f"(with ACCELERATE_USE_CPU=true on CPU)"
    )


def check_world_size(config: Config) -> None:
    """The processes the launcher started must be the config's P x D (one when not launched)."""
    world, p = launched_world_size(), config.pipeline
    if config.world_size == 1 and world not in (None, 1):
        raise ConfigError(
            f"pipeline.stages x pipeline.replicas = 1, but the launcher started {world} "
            f"processes; set pipeline.stages/pipeline.replicas to match or start one process"
        )
    if config.world_size > 1 and world is None:
        raise ConfigError(
            f"pipeline.stages={p.stages}, pipeline.replicas={p.replicas}: this needs "
            f"{config.world_size} processes; {_launch_hint(config)}"
        )
    if config.world_size > 1 and world != config.world_size:
        raise ConfigError(
            f"pipeline.stages x pipeline.replicas = {config.world_size}, but the launcher "
            f"started {world} processes; {_launch_hint(config)}"
        )
