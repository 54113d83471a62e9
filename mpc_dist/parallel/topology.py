"""Who is where: P pipeline stages x D data-parallel replicas.

Position ``replica * P + stage`` holds world rank ``order[position]``. By default the order is
the identity (rank r is stage ``r % P`` of replica ``r // P``); ``pack_pipelines`` derives it
from where the launcher placed each rank, so that a pipeline's neighbours share a node and only
the data-parallel reduction crosses nodes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    stages: int
    replicas: int
    rank: int = 0
    order: tuple[int, ...] = ()  # world rank at each position; () is the identity

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")
        if self.order and sorted(self.order) != list(range(self.world_size)):
            raise ValueError(f"order {self.order} is not a permutation of the world's ranks")

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    def position(self, rank: int) -> int:
        return self.order.index(rank) if self.order else rank

    @property
    def stage(self) -> int:
        return self.position(self.rank) % self.stages

    @property
    def replica(self) -> int:
        return self.position(self.rank) // self.stages

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        position = (self.replica if replica is None else replica) * self.stages + stage
        return self.order[position] if self.order else position

    def pipeline_ranks(self, replica: int) -> list[int]:
        return [self.rank_of(k, replica) for k in range(self.stages)]

    def data_parallel_ranks(self, stage: int) -> list[int]:
        return [self.rank_of(stage, d) for d in range(self.replicas)]

    def describe(self, rank: int) -> str:
        position = self.position(rank)
        return f"rank {rank} (stage {position % self.stages}, replica {position // self.stages})"


def pack_pipelines(nodes: list[str], local_ranks: list[int], stages: int) -> tuple[int, ...]:
    """The order (world rank per position) that puts each pipeline on as few nodes as possible.

    ``nodes[r]`` and ``local_ranks[r]`` say where world rank r runs. Every node first fills
    whole pipelines from its own ranks, in local-rank order; the ranks left over on each node
    are then chained in node order, so a pipeline that must span nodes crosses as few
    boundaries as the node sizes allow.
    """
    by_node: dict[str, list[int]] = defaultdict(list)
    for rank in sorted(range(len(nodes)), key=lambda r: local_ranks[r]):
        by_node[nodes[rank]].append(rank)
    whole, leftover = [], []
    for ranks in by_node.values():  # nodes in order of first appearance
        cut = len(ranks) - len(ranks) % stages
        whole += ranks[:cut]
        leftover += ranks[cut:]
    return tuple(whole + leftover)


def spanning_pipelines(topology: Topology, nodes: list[str]) -> dict[int, list[str]]:
    """Replicas whose stages sit on more than one node, with those nodes in stage order."""
    spans = {}
    for replica in range(topology.replicas):
        used = [nodes[r] for r in topology.pipeline_ranks(replica)]
        if len(set(used)) > 1:
            spans[replica] = list(dict.fromkeys(used))
    return spans
