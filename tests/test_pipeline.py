"""The pipeline runtime over real gloo process groups equals the single-process engine."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from helpers import train_one_process
from processes import queue, run

from mpc_dist.config import ModelConfig, OptimConfig
from mpc_dist.core import EngineOptions, HorizonEngine, Plan
from mpc_dist.models import build_model
from mpc_dist.parallel import (
    Groups,
    RuntimeOptions,
    ScheduleSpec,
    Topology,
    stage_ranges,
    uniform_partition,
)
from mpc_dist.train import build_stage

T, STEPS, BATCH = 4, 3, 8
MODES = ("sync", "async")
SHAPE = (1, 6, 6)


def make(head: str, width: int = 8):
    torch.manual_seed(0)
    spec = ModelConfig(name="residual_mlp", num_blocks=T, width=width, hidden=12, head=head)
    return build_model(spec, SHAPE, 5).double()


def batches(n: int = STEPS, size: int = BATCH):
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(size, *SHAPE, dtype=torch.float64, generator=g),
            torch.randint(0, 5, (size,), generator=g),
        )
        for _ in range(n)
    ]


def single_process(head: str, plan: Plan, m: int, data) -> dict[str, torch.Tensor]:
    model = make(head)
    engine = HorizonEngine(model, plan, EngineOptions(track_memory=False))
    return train_one_process(model, engine, data, m)


def pipeline(groups: Groups, head, plan, m, mode, data, policy="horizon", defer=False):
    topology = groups.topology
    ranges = stage_ranges(uniform_partition(T, topology.stages))
    options = RuntimeOptions(schedule=ScheduleSpec(m, mode, policy, defer), dtype=torch.float64)
    optim = OptimConfig("adam", lr=0.01)
    stage = build_stage(
        model=make(head), plan=plan, ranges=ranges, groups=groups, optim=optim, runtime=options
    )
    part, runtime = stage.model, stage.runtime
    share = data[0][0].shape[0] // topology.replicas
    d = topology.replica
    mine = [(x[d * share : (d + 1) * share], y[d * share : (d + 1) * share]) for x, y in data]
    if mode == "async":
        runtime.run(mine, [0.01] * len(mine))  # one schedule over all minibatches
    else:
        for batch in mine:
            runtime.run([batch], [0.01])
    return part, runtime


def exactness_cases():
    for stages in (4, 2):
        for h, rule, mode in itertools.product((1, 2, 4), ("receding", "shrinking"), MODES):
            for head in ("aux", "shared") if mode == "sync" else ("aux",):
                for defer in (False, True) if head == "aux" else (False,):
                    yield stages, h, rule, mode, head, defer


def check_exactness(rank: int, world: int) -> None:
    """P = 4 and P = 2 x D = 2; h in {1, 2, 4}; both rules and modes; weight gradients fused or
    deferred: 3 steps, 1e-6."""
    data = batches()
    layouts = {4: Topology(4, 1, rank), 2: Topology(2, 2, rank)}
    groups = {stages: Groups.create(t) for stages, t in layouts.items()}
    references = {}  # the mode and the deferral do not change the single-process run
    for stages, h, rule, mode, head, defer in exactness_cases():
        topology, plan, m = layouts[stages], Plan(rule, h, T), 2
        key = (head, rule, h, m * topology.replicas)
        if key not in references:
            references[key] = single_process(head, plan, m * topology.replicas, data)
        expected = references[key]
        part, _ = pipeline(groups[stages], head, plan, m, mode, data, defer=defer)
        case = f"P={stages} D={topology.replicas} {rule} h={h} {mode} {head} defer={defer}"
        for name, p in part.named_parameters():
            torch.testing.assert_close(
                p, expected[name], rtol=0, atol=1e-6, msg=lambda e, n=f"{case} {name}": f"{n}: {e}"
            )


def check_async_every_microbatch_count(rank: int, world: int) -> None:
    groups = Groups.create(Topology(4, 1, rank))
    for m in range(1, 17):
        for rule, h in (("receding", 1), ("receding", 2), ("shrinking", 2), ("receding", 3)):
            data = batches(n=2, size=2 * m)
            plan = Plan(rule, h, T)
            part, runtime = pipeline(groups, "aux", plan, m, "async", data)
            assert runtime.engine.outstanding == 0
            dist.barrier()


def check_memory(rank: int, world: int, results) -> None:
    topology = Topology(4, 1, rank)
    groups = Groups.create(topology)
    data = batches(n=1, size=64)
    peaks = {}
    for name, plan, m, mode, policy in (
        ("unit", Plan("receding", T, T), 1, "sync", "1f1b"),  # one microbatch's activations
        ("h1-async", Plan("receding", 1, T), 8, "async", "horizon"),
        ("bp-1f1b", Plan("receding", T, T), 8, "sync", "1f1b"),
    ):
        size = 8 if name == "unit" else 64
        sized = [(x[:size], y[:size]) for x, y in data]
        _, runtime = pipeline(groups, "aux", plan, m, mode, sized, policy)
        peaks[name] = runtime.engine.memory.peak_bytes
    if topology.stage == 0:
        results.put({k: v / peaks["unit"] for k, v in peaks.items()})


def test_pipeline_equals_single_process_engine():
    run(check_exactness, 4, timeout=400)


def test_async_completes_for_every_microbatch_count():
    run(check_async_every_microbatch_count, 4, timeout=400)


def test_stage_zero_activation_memory_h1_async_vs_1f1b():
    results = queue()
    run(check_memory, 4, results, timeout=200)
    ratio = results.get()
    assert ratio["h1-async"] <= 2.0, ratio
    assert ratio["bp-1f1b"] >= 4.0, ratio
