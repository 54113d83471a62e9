"""Ranks are placed from where the launcher put them: whole pipelines per node first."""

import dataclasses

import pytest

from mpc_dist.cli import main
from mpc_dist.parallel import Topology, pack_pipelines, spanning_pipelines


def layout(topology: Topology) -> list[tuple[int, int]]:
    """(stage, replica) of every world rank."""
    return [
        (t.stage, t.replica)
        for t in (dataclasses.replace(topology, rank=r) for r in range(topology.world_size))
    ]


def test_identity_when_ranks_are_contiguous_per_node():
    nodes, local = ["a"] * 4 + ["b"] * 4, [0, 1, 2, 3] * 2
    order = pack_pipelines(nodes, local, 4)
    assert order == tuple(range(8))
    assert layout(Topology(4, 2, 0, order)) == [(k, d) for d in range(2) for k in range(4)]


def test_interleaved_ranks_are_regrouped_by_node():
    # a launcher that numbered ranks round-robin over two nodes
    nodes, local = ["a", "b"] * 4, [0, 0, 1, 1, 2, 2, 3, 3]
    topology = Topology(4, 2, 0, pack_pipelines(nodes, local, 4))
    assert not spanning_pipelines(topology, nodes)
    for replica in range(2):
        ranks = topology.pipeline_ranks(replica)
        assert len({nodes[r] for r in ranks}) == 1
        assert [local[r] for r in ranks] == [0, 1, 2, 3]  # stage order follows local rank


def test_left_over_ranks_form_the_fewest_spanning_pipelines():
    # nodes of 2, 4 and 2 slots, pipelines of 4: one whole pipeline on b, one across a and c
    nodes = ["a"] * 2 + ["b"] * 4 + ["c"] * 2
    local = [0, 1, 0, 1, 2, 3, 0, 1]
    topology = Topology(4, 2, 0, pack_pipelines(nodes, local, 4))
    assert spanning_pipelines(topology, nodes) == {1: ["a", "c"]}
    assert topology.describe(2) == "rank 2 (stage 0, replica 0)"
    with pytest.raises(ValueError, match="permutation"):
        Topology(2, 1, 0, (0, 0))


def test_ray_dry_run_prints_the_planned_map(capsys):
    args = ["ray", "--config", "configs/vit_tiny_ray.yaml", "--dry-run", "--nodes", "3",
            "--workers-per-node", "3"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8 workers" in out and "placement PACK" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 8
    assert "warning: replica 1 spans node1 -> node2" in out  # 3 slots per node, pipelines of 4
