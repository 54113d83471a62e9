"""Who is where: P pipeline stages x D data-parallel replicas.

Rank r is stage ``r % P`` of replica ``r // P``: each replica is a run of consecutive ranks, so a
pipeline's neighbours are neighbouring ranks (on one node with ``--nproc-per-node P``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    stages: int
    replicas: int
    rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.stages + stage

    def pipeline_ranks(self, replica: int) -> list[int]:
        return [self.rank_of(k, replica) for k in range(self.stages)]

    def data_parallel_ranks(self, stage: int) -> list[int]:
        return [self.rank_of(stage, d) for d in range(self.replicas)]

    def describe(self, rank: int) -> str:
        return f"rank {rank} (stage {rank % self.stages}, replica {rank // self.stages})"
