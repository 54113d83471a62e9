"""Joining a launcher's job: the process group, this rank's place and device, the watchdog,
agreeing on what rank 0 decides (the plan under ``horizon: auto``, a timed partition), and
checking that the run directory is one filesystem every rank sees."""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
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
    init_process_group(backend, p.collective_timeout, device)
    topology = place_ranks(p.stages, p.replicas)
    several_agents = int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1
    if shares_agent_store_across_restarts() and several_agents and topology.rank == 0:
        print(
            "mpc-dist: warning: torchrun's restarts on several nodes share its store "
            "between attempts (pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "where torchrun starts",
            file=sys.stderr,
        )
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


def shared_directory_misses(directory: str | Path, attempts: int = 5) -> list[int]:
    """The ranks that cannot read a token rank 0 wrote into ``directory`` (empty: every rank
    sees one filesystem there). Collective over the default group; creates ``directory`` on
    rank 0's node and leaves nothing else behind."""
    directory = Path(directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    path = directory / f".mpc-dist-shared-{token[0]}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(token[0])
    dist.barrier()
    seen = False
    for attempt in range(attempts):  # a network filesystem may show a new file late
        try:
            seen = path.read_text() == token[0]
        except OSError:
            seen = False
        if seen:
            break
        time.sleep(0.1 * 2**attempt)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, seen)
    dist.barrier()
    if rank == 0:
        path.unlink(missing_ok=True)
    return [r for r, ok in enumerate(everyone) if not ok]


def check_shared_directory(directory: str | Path, field: str = "run.out_dir") -> None:
    """Raise ``ConfigError`` unless every rank sees ``directory`` as one filesystem (collective):
    checkpoints are written by every rank and committed by rank 0 there."""
    misses = shared_directory_misses(directory)
    if misses:
        raise ConfigError(
            f"{field}={directory}: rank(s) {ranks_text(misses)} cannot read what rank 0 wrote "
            f"there, so it is not one filesystem shared by every node; put {field} on a filesystem "
            f"every node mounts (NFS, Lustre, EFS, a ReadWriteMany volume)"
        )


def ranks_text(ranks: list[int]) -> str:
    """0,1,2,3,5 -> 0-3,5"""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
