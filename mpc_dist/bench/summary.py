"""One case's result from every rank's measurements (rank 0): time per minibatch, bubbles
(idle outside the actions, and outside the blocks' compute), peak activation memory; and the
simulator's prediction for the same schedule, calibrated with the framework time measured."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

from ..core import Plan
from ..parallel import (
    COMPUTE,
    Costs,
    Schedule,
    ScheduleSpec,
    busy_time,
    generate,
    simulate,
    stage_ranges,
    steady_state,
)
from .cases import BenchOptions, Case
from .emulate import Sleep


@dataclass
class RankMeasurement:
    """What one rank measured of one case (seconds from ``time.perf_counter``)."""

    step_times: list[float]  # sync: every measured step
    windows: list[tuple[float, float]]  # (start, end) of every measured step (async: the run)
    peak_bytes: int  # activations held at most
    step_ends: list[float] = field(default_factory=list)  # ours: the end of every S action
    first_forward: float | None = None  # ours: the start of the first F action
    actions: list[tuple[float, float]] = field(default_factory=list)  # ours: F, B, W actions
    overhead: tuple[float, float, float] = (0.0, 0.0, 0.0)  # ours: framework s per F, B, W
    # ours: every S action's duration; the stage that reaches a step last waits least, so its
    # duration is the step's own cost
    step_durations: list[float] = field(default_factory=list)
    # ours with real blocks: the runtime's F, B, W actions (CUDA events on a GPU), for the charts
    timeline: list[Sleep] = field(default_factory=list)
    allocated_bytes: int | None = None  # CUDA: max_memory_allocated over the case, beyond its start


@dataclass
class RankOutcome:
    """One rank's part of one case, gathered on rank 0."""

    measured: RankMeasurement | None  # None: the case failed here
    trace: list[Sleep]  # the emulated blocks' sleeps
    error: str | None = None


@dataclass(frozen=True)
class Calibration:
    """Measured on every run before the cases: what the simulator is fed."""

    latency_ms: float  # one-way message between neighbouring stages
    block_costs: Costs  # per block: emulated, or measured (``--real``)


@dataclass(frozen=True)
class Overheads:
    """Framework seconds besides the blocks, measured on our runtime: per F, B and W action and
    per optimizer step."""

    forward: float = 0.0
    backward: float = 0.0
    weight: float = 0.0
    step: float = 0.0


@dataclass
class Result:
    case: Case
    time_per_minibatch: float = 0.0  # seconds, median over measured steps
    samples_per_s: float = 0.0
    bubble: list[float] = field(default_factory=list)  # per stage: idle outside F/B actions
    compute_bubble: list[float] = field(default_factory=list)  # idle outside the blocks' compute
    simulated_bubble: list[float] | None = None
    simulated_time: float | None = None
    fill: float | None = None  # async: seconds until the last stage starts
    # framework time per F, B, W action; two zeros where the simulator has no such schedule
    # (as bench.csv has always had it)
    overhead_ms: tuple[float, ...] = (0.0, 0.0)
    peak_mib: list[float] = field(default_factory=list)  # activations per rank
    allocated_mib: list[float] = field(default_factory=list)  # CUDA: peak allocated per rank
    vs_torch_1f1b: float = 0.0  # speed-up in time per minibatch over torch Schedule1F1B
    vs_best_torch: float = 0.0  # ... over the fastest torch schedule at the same m
    trace: list[tuple[int, str, float, float]] = field(default_factory=list)  # stage, kind, s, e


def summarize(
    case: Case, outcomes: list[RankOutcome], options: BenchOptions, calibration: Calibration
) -> Result:
    """The case's result from every rank's outcome (a failure on any rank names the case)."""
    errors = [o.error for o in outcomes if o.error]
    if errors:
        return Result(dataclasses.replace(case, name=f"{case.name} (failed: {errors[0]})"))
    result = Result(case)
    per_rank = [o.measured for o in outcomes]
    # Real blocks are not timestamped: our runtime's actions draw the timeline instead.
    traces = [o.measured.timeline if options.real else o.trace for o in outcomes]
    result.trace = [(k, kind, s, e) for k, tr in enumerate(traces) for kind, _, s, e in tr]
    compute = [[(s, e) for _, _, s, e in tr] for tr in traces]
    # Our runtime timestamps every action; for the baselines the blocks' compute is all we see.
    actions = [r.actions or c for r, c in zip(per_rank, compute, strict=True)]
    if case.mode == "async":
        _steady_state(result, per_rank, actions, compute, options.warmup)
    else:
        _per_step(result, per_rank, actions, compute, options.steps)
    if options.real:  # real blocks are not timestamped: only our runtime's actions are
        result.compute_bubble = []
        result.bubble = result.bubble if case.system == "ours" else []
    result.samples_per_s = options.microbatch_size * case.microbatches / result.time_per_minibatch
    result.peak_mib = [r.peak_bytes / 2**20 for r in per_rank]
    if all(r.allocated_bytes is not None for r in per_rank):
        result.allocated_mib = [r.allocated_bytes / 2**20 for r in per_rank]
    overheads = _overheads(per_rank) if case.system == "ours" else Overheads()
    _simulate_case(result, options, calibration, overheads)
    return result


def _steady_state(result: Result, per_rank: list[RankMeasurement], actions, compute, warmup):
    """Async: the steady state's time per minibatch and bubbles, and the pipeline's fill."""
    start = max(r.windows[0][0] for r in per_rank)
    ends = [r.step_ends for r in per_rank]
    result.time_per_minibatch, window = steady_state(ends, warmup, start)
    result.bubble, result.compute_bubble = (
        [1 - busy_time(iv, window) / (window[1] - window[0]) for iv in kind]
        for kind in (actions, compute)
    )
    start = min(r.windows[0][0] for r in per_rank)
    result.fill = per_rank[-1].first_forward - start


def _per_step(result: Result, per_rank: list[RankMeasurement], actions, compute, steps: int):
    """Sync: the median step (the slowest rank's) and the bubbles averaged over the steps."""
    times = [max(r.step_times[i] for r in per_rank) for i in range(steps)]
    result.time_per_minibatch = statistics.median(times)
    windows = [
        (min(r.windows[i][0] for r in per_rank), max(r.windows[i][1] for r in per_rank))
        for i in range(steps)
    ]
    result.bubble, result.compute_bubble = (
        [statistics.mean(1 - busy_time(iv, w) / (w[1] - w[0]) for w in windows) for iv in kind]
        for kind in (actions, compute)
    )


def _overheads(per_rank: list[RankMeasurement]) -> Overheads:
    """Our framework time per F, B, W action and per step, as measured (medians over ranks)."""
    per_action = [statistics.median(r.overhead[k] for r in per_rank) for k in range(3)]
    steps = zip(*(r.step_durations for r in per_rank), strict=True)
    return Overheads(*per_action, step=statistics.median(min(durations) for durations in steps))


def _simulated_schedule(case: Case, options: BenchOptions) -> Schedule | None:
    """The schedule of ``case`` for the simulator (None: one it does not model)."""
    T = options.blocks
    if case.system == "ours":
        plan, policy = Plan(case.rule, case.horizon or T, T), case.policy
    elif case.policy in ("Schedule1F1B", "1f1b"):
        plan, policy = Plan("receding", T, T), "1f1b"
    elif case.policy == "ScheduleGPipe":
        plan, policy = Plan("receding", T, T), "gpipe"
    else:
        return None
    minibatches = options.warmup + options.steps if case.mode == "async" else 1
    ranges = stage_ranges([options.blocks_per_stage] * options.stages)
    spec = ScheduleSpec(case.microbatches, case.mode, policy, case.defer)
    return generate(plan, ranges, spec, minibatches)


def _simulate_case(
    result: Result, options: BenchOptions, calibration: Calibration, overheads: Overheads
) -> None:
    """The simulator's time and bubbles for the case, with the measured costs and overheads."""
    schedule = _simulated_schedule(result.case, options)
    if schedule is None:
        return
    P = options.stages
    costs = dataclasses.replace(
        calibration.block_costs,
        step=overheads.step,
        latency=calibration.latency_ms / 1000,
        forward_overhead=overheads.forward,
        backward_overhead=overheads.backward,
        weight_overhead=overheads.weight,
    )
    per_action = (overheads.forward, overheads.backward, overheads.weight)
    result.overhead_ms = tuple(1000 * o for o in per_action)
    events = simulate(schedule, costs)
    compute = [e for e in events if e.action.kind in COMPUTE]
    if result.case.mode == "async":
        ends = [[e.end for e in compute if e.stage == k and e.action.kind == "S"] for k in range(P)]
        result.simulated_time, (lo, hi) = steady_state(ends, options.warmup)
    else:
        lo, hi = 0.0, max(e.end for e in events)
        result.simulated_time = hi
    busy = [
        [(e.start, e.end) for e in compute if e.stage == k and e.action.kind != "S"]
        for k in range(P)
    ]
    result.simulated_bubble = [1 - busy_time(b, (lo, hi)) / (hi - lo) for b in busy]
