"""One rank of ``mpc-dist bench`` (started by torchrun): the message latency and the per-block
costs the simulator is fed, then every case on this rank, measured from the blocks' own
timestamps identically for every system; rank 0 summarises each case and writes the report.
Under ``--device cuda`` the rank computes on the GPU of its local rank and talks over NCCL;
steps are timed with CUDA events (``timing.py``)."""

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
from ..parallel import (
    Costs,
    Groups,
    RuntimeOptions,
    ScheduleSpec,
    Topology,
    action_costs,
    device_and_backend,
    init_process_group,
    stage_ranges,
)
from ..train import build_stage
from ..train.precision import configure_tf32
from . import emulate
from .blocks import Autocast, real_block, real_model, state_shape
from .cases import BenchOptions, Case, cases
from .report import print_row, write_reports
from .summary import Calibration, RankMeasurement, RankOutcome, summarize
from .timing import PeakMemory, StepTimer, synchronize

COLLECTIVE_TIMEOUT_S = 1800  # a slow case (ViT-L, many microbatches) is not a hang


def worker(options: BenchOptions) -> None:
    """Runs on every rank; rank 0 prints every case's row and writes the report."""
    device = _join(options)
    rank = dist.get_rank()
    groups = Groups.create(Topology(options.stages, 1, rank))
    groups.warm_up(device)
    calibration = Calibration(
        _measure_latency(options, rank, device), _block_costs(options, device)
    )
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


def _join(options: BenchOptions) -> torch.device:
    """This rank's device and the process group: under ``--device cuda`` the GPU of its local
    rank (set before the group starts) and NCCL, fp32 matmuls on TF32 as training runs them by
    default; else the CPU, one thread, and gloo."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if options.device == "cuda" else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device, backend = device_and_backend(local_rank, "auto", options.device)
    init_process_group(backend, COLLECTIVE_TIMEOUT_S, device)
    if device.type == "cuda":
        configure_tf32(True, device)
    else:
        torch.set_num_threads(1)
    return device


def _run(
    case: Case,
    options: BenchOptions,
    calibration: Calibration,
    groups: Groups,
    recorder: emulate.Recorder,
) -> RankOutcome:
    """One case on this rank; a system that cannot run here is reported, not fatal."""
    memory = PeakMemory(options.rank_device())
    recorder.take()
    recorder.recording = True
    try:
        if case.system == "ours":
            measured = _run_ours(case, options, calibration.block_costs, groups, recorder)
        else:
            measured = _run_baseline(case, options, recorder)
        measured.allocated_bytes = memory.peak_bytes()
        error = None
    except Exception as exc:
        measured, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    recorder.recording = False
    return RankOutcome(measured, recorder.take(), error)


def _our_model(case: Case, options: BenchOptions, recorder: emulate.Recorder):
    T, cost, aux = options.blocks, options.cost_ms / 1000, case.mode == "async"
    if not options.real:
        return emulate.emulated_model(
            T, options.width, cost, cost, cost, aux_heads=aux, recorder=recorder
        )
    return real_model(options, aux_heads=aux)


def _block_costs(options: BenchOptions, device: torch.device) -> Costs:
    """Per-block seconds: the emulated ones, or (``--real``) measured on rank 0 for everyone,
    on its device, in the bench's precision (``core.costs`` synchronises around each)."""
    if not options.real:
        cost = options.cost_ms / 1000
        return Costs(cost, cost, cost)
    measured: list = [None]
    if dist.get_rank() == 0:
        block, compute = real_block(options, 0, device), options.compute
        sample = torch.randn(options.microbatch_size, *state_shape(options), device=device)
        params = list(block.parameters())
        block_costs = measure_block(block, params, compute.state(sample), compute, repeats=10)
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
    settings = RuntimeOptions(schedule=spec, device=options.rank_device(), trace=True)
    ranges = stage_ranges([options.blocks_per_stage] * P)
    runtime = build_stage(
        model=model,
        plan=plan,
        ranges=ranges,
        groups=groups,
        optim=frozen,
        runtime=settings,
        compute=options.compute,
    ).runtime
    step_times, windows = _timed_steps(runtime, case, options)
    trace = runtime.trace
    blocks = [(a, s, e) for a, s, e in trace if a.kind in ("F", "B", "W")]
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
        actions=[(s, e) for _, s, e in blocks],
        overhead=tuple(statistics.median(o) if o else 0.0 for o in over.values()),
        step_durations=[e - s for a, s, e in trace if a.kind == "S"],
        timeline=[(a.kind.value, a.microbatch, s, e) for a, s, e in blocks],
    )


def _timed_steps(runtime, case: Case, options: BenchOptions) -> tuple[list, list]:
    """Sync: every step timed after the warm-up; async: the whole run of minibatches. Only
    the first stage reads the batch (already on its device: no copy inside a timed step)."""
    device = options.rank_device()
    n = options.microbatch_size * case.microbatches
    batch = _batch(options, case.microbatches, device) if runtime.stage == 0 else (None, None)
    total = options.warmup + options.steps
    timer = StepTimer(device)
    if case.mode == "sync":
        for _ in range(total):
            with timer.step():
                runtime.run([batch], [0.0], batch_size=n)
        return timer.durations(skip=options.warmup), timer.windows[options.warmup :]
    with timer.step():
        runtime.run([batch] * total, [0.0] * total, batch_size=n)
    return [], timer.windows


def _run_baseline(case: Case, options: BenchOptions, recorder: emulate.Recorder) -> RankMeasurement:
    from . import baselines

    T, cost = options.blocks, options.cost_ms / 1000
    blocks = max(T, options.stages * baselines.stages_per_rank(case.policy))
    # Same per-rank compute for every system: emulated, a rank holding two stages of one block
    # runs them at half cost; real blocks are the same blocks, two stages of T / 2P each.
    per_block = cost * T / blocks
    made: list[nn.Module] = []
    compute, device = options.compute, options.rank_device()

    def make_block(i: int):
        if options.real:
            block = real_block(options, i, device)
            block = Autocast(block, compute) if compute.autocast_dtype else block
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
        microbatch_shape=(options.microbatch_size, *state_shape(options)),
        num_microbatches=case.microbatches,
        steps=options.steps,
        warmup=options.warmup,
        around_step=meter.hooks,
        loss_fn=_loss,
    )
    if case.system == "torch":
        dtype = compute.autocast_dtype if options.real else None
        result = baselines.run_torch_pipelining(case.policy, **common, activation_dtype=dtype)
    else:
        result = baselines.run_deepspeed_pipeline(**common)
    return RankMeasurement(result.step_times, result.windows, meter.peak_bytes)


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The baselines' mean squared error, in float32 whatever the blocks compute in."""
    return nn.functional.mse_loss(output.float(), target.float())


def _batch(
    options: BenchOptions, m: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = options.microbatch_size * m
    inputs = torch.randn(n, *state_shape(options), generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return inputs.to(device), labels.to(device)


def _measure_latency(options: BenchOptions, rank: int, device: torch.device, rounds: int = 30):
    """One-way milliseconds of an activation-sized message (in the dtype states travel in)
    between neighbouring stages: ping-pong between ranks 0 and 1, timed between device
    synchronisations, broadcast to all."""
    dtype = options.compute.autocast_dtype if options.real else None
    shape = (options.microbatch_size, *state_shape(options))
    buffer = torch.zeros(shape, dtype=dtype or torch.float32, device=device)
    elapsed = torch.zeros(1, device=device)
    if rank in (0, 1):
        peer = 1 - rank
        for i in range(rounds + 5):
            if i == 5:
                synchronize(device)
                start = time.perf_counter()
            if rank == 0:
                dist.send(buffer, peer)
                dist.recv(buffer, peer)
            else:
                dist.recv(buffer, peer)
                dist.send(buffer, peer)
        synchronize(device)
        elapsed[0] = (time.perf_counter() - start) / (2 * rounds)
    dist.broadcast(elapsed, src=0)
    return 1000 * elapsed.item()
