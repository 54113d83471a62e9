"""One rank of ``mpc-dist bench`` (started by torchrun): the message latency and the per-block
costs the simulator is fed, then every case on this rank, measured from the blocks' own
timestamps identically for every system; rank 0 summarises each case and writes the report."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn

from ..config import OptimConfig
from ..console import console
from ..core import ActivationMemory, Plan
from ..core.costs import measure_block
from ..models import pipeline_model
from ..models.mlp import MLPBlock, NormLinearHead
from ..parallel import (
    Costs,
    Groups,
    RuntimeOptions,
    ScheduleSpec,
    Topology,
    action_costs,
    stage_ranges,
)
from ..train import build_stage
from . import emulate
from .cases import BenchOptions, Case, cases
from .report import print_row, write_reports
from .summary import Calibration, RankMeasurement, RankOutcome, summarize


def worker(options: BenchOptions) -> None:
    """Runs on every rank; rank 0 prints every case's row and writes the report."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    groups = Groups.create(Topology(options.stages, 1, rank))
    calibration = Calibration(_measure_latency(options, rank), _block_costs(options))
    if rank == 0:
        c, how = calibration.block_costs, "measured" if options.real else "emulated"
        console.print(
            f"measured message latency {calibration.latency_ms:.2f} ms (used by the simulator)"
        )
        console.print(
            f"per block ({how}): F {1000 * c.forward:.2f} ms, B {1000 * c.input_grad:.2f} ms, "
            f"W {1000 * c.weight_grad:.2f} ms"
        )
    results, recorder = [], emulate.Recorder()
    for case in cases(options):
        gathered: list = [None] * options.stages
        dist.all_gather_object(gathered, _run(case, options, calibration, groups, recorder))
        if rank == 0:
            results.append(summarize(case, gathered, options, calibration))
            print_row(results[-1])
        dist.barrier()
    if rank == 0:
        write_reports(results, options, calibration)
    dist.destroy_process_group()


def _run(
    case: Case,
    options: BenchOptions,
    calibration: Calibration,
    groups: Groups,
    recorder: emulate.Recorder,
) -> RankOutcome:
    """One case on this rank; a system that cannot run here is reported, not fatal."""
    recorder.take()
    recorder.recording = True
    try:
        if case.system == "ours":
            measured = _run_ours(case, options, calibration.block_costs, groups, recorder)
        else:
            measured = _run_baseline(case, options, recorder)
        error = None
    except Exception as exc:
        measured, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    recorder.recording = False
    return RankOutcome(measured, recorder.take(), error)


def _real_block(options: BenchOptions, index: int) -> nn.Module:
    """A real block for ``--real``: the residual MLP block, seeded by its index."""
    torch.manual_seed(index)
    return MLPBlock(options.width, options.hidden)


def _our_model(case: Case, options: BenchOptions, recorder: emulate.Recorder):
    T, cost, aux = options.blocks, options.cost_ms / 1000, case.mode == "async"
    if not options.real:
        return emulate.emulated_model(
            T, options.width, cost, cost, cost, aux_heads=aux, recorder=recorder
        )
    torch.manual_seed(0)
    head = NormLinearHead(options.width, 10)
    blocks = [_real_block(options, t) for t in range(T)]
    aux_head = lambda shape: NormLinearHead(shape[0], 10)
    head_mode = "aux" if aux else "shared"
    return pipeline_model(
        nn.Identity(), blocks, head, (options.width,), aux_head=aux_head, head_mode=head_mode
    )


def _block_costs(options: BenchOptions) -> Costs:
    """Per-block seconds: the emulated ones, or (``--real``) measured on rank 0 for everyone."""
    if not options.real:
        cost = options.cost_ms / 1000
        return Costs(cost, cost, cost)
    measured: list = [None]
    if dist.get_rank() == 0:
        block = _real_block(options, 0)
        sample = torch.randn(options.microbatch_size, options.width)
        block_costs = measure_block(block, list(block.parameters()), sample, repeats=10)
        measured = [Costs(**asdict(block_costs))]
    dist.broadcast_object_list(measured, src=0)
    return measured[0]


def _run_ours(
    case: Case,
    options: BenchOptions,
    block_costs: Costs,
    groups: Groups,
    recorder: emulate.Recorder,
) -> RankMeasurement:
    P, m, T = options.stages, case.microbatches, options.blocks
    model = _our_model(case, options, recorder)
    plan = Plan(case.rule, case.horizon or T, T)
    frozen = OptimConfig(name="sgd", lr=0.0, momentum=0.0)  # timing only: weights stay put
    spec = ScheduleSpec(m, case.mode, case.policy, case.defer)
    settings = RuntimeOptions(schedule=spec, trace=True)
    ranges = stage_ranges([options.blocks_per_stage] * P)
    runtime = build_stage(
        model=model, plan=plan, ranges=ranges, groups=groups, optim=frozen, runtime=settings
    ).runtime
    step_times, windows = _timed_steps(runtime, case, options)
    trace = runtime.trace
    # Framework time per action besides the blocks, to calibrate the simulator.
    predicted = action_costs(runtime.schedule(1), block_costs)
    over = {
        kind: [e - s - predicted(a) for a, s, e in trace if a.kind == kind]
        for kind in ("F", "B", "W")
    }
    return RankMeasurement(
        step_times=step_times,
        windows=windows,
        peak_bytes=runtime.engine.memory.peak_bytes,
        step_ends=[end for action, _, end in trace if action.kind == "S"],
        first_forward=min(s for action, s, _ in trace if action.kind == "F"),
        actions=[(s, e) for a, s, e in trace if a.kind in ("F", "B", "W")],
        overhead=tuple(statistics.median(o) if o else 0.0 for o in over.values()),
        step_durations=[e - s for a, s, e in trace if a.kind == "S"],
    )


def _timed_steps(runtime, case: Case, options: BenchOptions) -> tuple[list, list]:
    """Sync: every step timed after the warm-up; async: the whole run of minibatches."""
    batch = _batch(options, case.microbatches)
    total = options.warmup + options.steps
    step_times, windows = [], []
    if case.mode == "sync":
        for step in range(total):
            dist.barrier()
            start = time.perf_counter()
            runtime.run([batch], [0.0])
            end = time.perf_counter()
            if step >= options.warmup:
                step_times.append(end - start)
                windows.append((start, end))
    else:
        dist.barrier()
        start = time.perf_counter()
        runtime.run([batch] * total, [0.0] * total)
        windows.append((start, time.perf_counter()))
    return step_times, windows


def _run_baseline(case: Case, options: BenchOptions, recorder: emulate.Recorder) -> RankMeasurement:
    from . import baselines

    T, cost = options.blocks, options.cost_ms / 1000
    blocks = max(T, options.stages * baselines.stages_per_rank(case.policy))
    # Same per-rank compute for every system: emulated, a rank holding two stages of one block
    # runs them at half cost; real blocks are the same blocks, two stages of T / 2P each.
    per_block = cost * T / blocks
    made: list[nn.Module] = []

    def make_block(i: int):
        if options.real:
            block = _real_block(options, i)
        else:
            costs = (per_block, per_block, per_block)
            block = emulate.EmulatedBlock(options.width, i, *costs, recorder)
        made.append(block)
        return block

    # weights saved for backward are not activations (as in our engine's accounting)
    meter = ActivationMemory(lambda: [p for block in made for p in block.parameters()])
    common = dict(
        make_block=make_block,
        num_blocks=blocks,
        microbatch_shape=(options.microbatch_size, options.width),
        num_microbatches=case.microbatches,
        steps=options.steps,
        warmup=options.warmup,
        around_step=meter.hooks,
    )
    if case.system == "torch":
        result = baselines.run_torch_pipelining(case.policy, **common)
    else:
        result = baselines.run_deepspeed_pipeline(**common)
    return RankMeasurement(result.step_times, result.windows, meter.peak_bytes)


def _batch(options: BenchOptions, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = options.microbatch_size * m
    return torch.randn(n, options.width, generator=g), torch.randint(0, 10, (n,), generator=g)


def _measure_latency(options: BenchOptions, rank: int, rounds: int = 30) -> float:
    """One-way milliseconds of an activation-sized message between neighbouring stages
    (ping-pong between ranks 0 and 1, broadcast to all)."""
    buffer = torch.zeros(options.microbatch_size, options.width)
    elapsed = torch.zeros(1)
    if rank in (0, 1):
        peer = 1 - rank
        for i in range(rounds + 5):
            if i == 5:
                start = time.perf_counter()
            if rank == 0:
                dist.send(buffer, peer)
                dist.recv(buffer, peer)
            else:
                dist.recv(buffer, peer)
                dist.send(buffer, peer)
        elapsed[0] = (time.perf_counter() - start) / (2 * rounds)
    dist.broadcast(elapsed, src=0)
    return 1000 * elapsed.item()
