"""`mpc-dist bench`: pipeline bubbles, throughput and activation memory of our schedules against
the field, at several microbatch counts.

All systems run the same emulated blocks (``emulate.py``) in one set of P processes, at every
m of ``--microbatches`` (default P and 4P): our BP-1F1B, BP-1F1B with deferred weight gradients
(zero-bubble's split), BP-GPipe and horizon schedules (rules x horizons x modes);
torch.distributed.pipelining's 1F1B, GPipe, Interleaved1F1B, InterleavedZeroBubble,
ZBVZeroBubble and DualPipeV; and DeepSpeed's PipelineEngine. Every number is measured from the
blocks' own timestamps, identically for every system, and ours are compared with the
simulator's prediction for the same schedule and costs. Peak activation memory is counted with
saved-tensor hooks on every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    COMPUTE,
    Costs,
    Groups,
    RuntimeOptions,
    Topology,
    action_costs,
    busy_time,
    generate,
    simulate,
    stage_ranges,
    steady_state,
)
from ..train import build_stage
from . import emulate

# --systems names -> torch.distributed.pipelining schedule classes (the rest: two stages per rank)
TORCH = {
    "1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe", "interleaved": "ScheduleInterleaved1F1B",
    "interleaved-zb": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}  # fmt: skip
SYSTEMS = (*TORCH, "deepspeed")


@dataclass
class Case:
    system: str  # ours | torch | deepspeed
    name: str
    microbatches: int
    rule: str = "receding"
    horizon: int = 0  # 0: back-propagation (h = P)
    mode: str = "sync"
    policy: str = "horizon"  # ours: 1f1b | gpipe | horizon; torch: the schedule class
    defer: bool = False  # ours: weight gradients deferred (W actions)


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
    overhead_ms: tuple[float, float] = (0.0, 0.0)  # measured framework time per F, per B action
    peak_mib: list[float] = field(default_factory=list)  # activations per rank
    vs_torch_1f1b: float = 0.0  # speed-up in time per minibatch over torch Schedule1F1B
    vs_best_torch: float = 0.0  # ... over the fastest torch schedule at the same m
    trace: list[tuple[int, str, float, float]] = field(default_factory=list)  # stage, kind, s, e


def cases(args: argparse.Namespace) -> list[Case]:
    out = []
    for m in args.microbatches:
        out += [Case("torch", f"torch {TORCH[s]}", m, policy=TORCH[s]) for s in args.systems
                if s in TORCH]  # fmt: skip
        out += [
            Case("ours", "ours BP-1F1B", m, policy="1f1b"),
            Case("ours", "ours BP-1F1B +W", m, policy="1f1b", defer=True),
            Case("ours", "ours BP-GPipe", m, policy="gpipe"),
        ]
        for mode in args.modes:
            for rule in args.rules:
                for h in args.horizons:
                    if h >= _blocks(args) or (rule == "shrinking" and h == 1):  # BP, receding 1
                        continue
                    out.append(Case("ours", f"ours {rule} h={h} {mode}", m, rule, h, mode))
                    if h in args.defer_horizons and rule == "receding":
                        out.append(Case("ours", f"ours {rule} h={h} {mode} +W", m, rule, h, mode,
                                        defer=True))  # fmt: skip
        if "deepspeed" in args.systems:
            out.append(Case("deepspeed", "DeepSpeed PipelineEngine (1F1B)", m, policy="1f1b"))
    return out


# ----------------------------------------------------------------------------- one rank


def _blocks(args) -> int:
    """T: the blocks of our pipeline (``--blocks-per-stage`` on each of P stages)."""
    return args.stages * args.blocks_per_stage


def _real_block(args, index: int) -> nn.Module:
    """A real block for ``--real``: the residual MLP block, seeded by its index."""
    torch.manual_seed(index)
    return MLPBlock(args.width, args.hidden)


def _our_model(case: Case, args, recorder: emulate.Recorder):
    T, cost, aux = _blocks(args), args.cost_ms / 1000, case.mode == "async"
    if not args.real:
        return emulate.emulated_model(T, args.width, cost, cost, cost, aux_heads=aux,
                                      recorder=recorder)  # fmt: skip
    torch.manual_seed(0)
    head = NormLinearHead(args.width, 10)
    return pipeline_model(
        nn.Identity(), [_real_block(args, t) for t in range(T)], head, (args.width,),
        aux_head=lambda shape: NormLinearHead(shape[0], 10), head_mode="aux" if aux else "shared",
    )  # fmt: skip


def _costs(args) -> Costs:
    """Per-block seconds: the emulated ones, or (``--real``) measured on rank 0 for everyone."""
    if not args.real:
        cost = args.cost_ms / 1000
        return Costs(cost, cost, cost)
    measured: list = [None]
    if dist.get_rank() == 0:
        block = _real_block(args, 0)
        sample = torch.randn(args.microbatch_size, args.width)
        block_costs = measure_block(block, list(block.parameters()), sample, repeats=10)
        measured = [Costs(**asdict(block_costs))]
    dist.broadcast_object_list(measured, src=0)
    return measured[0]


def _run_ours(case: Case, args, groups: Groups, recorder: emulate.Recorder) -> dict:
    P, m, T = args.stages, case.microbatches, _blocks(args)
    model = _our_model(case, args, recorder)
    plan = Plan(case.rule, case.horizon or T, T)
    frozen = OptimConfig(name="sgd", lr=0.0, momentum=0.0)  # timing only: weights stay put
    options = RuntimeOptions(m, case.mode, case.policy, trace=True, defer_weights=case.defer)
    ranges = stage_ranges([args.blocks_per_stage] * P)
    runtime = build_stage(model, plan, ranges, groups, frozen, options).runtime
    batch = _batch(args, m)
    total = args.warmup + args.steps
    step_times, windows = [], []
    if case.mode == "sync":
        for step in range(total):
            dist.barrier()
            start = time.perf_counter()
            runtime.run([batch], [0.0])
            end = time.perf_counter()
            if step >= args.warmup:
                step_times.append(end - start)
                windows.append((start, end))
    else:
        dist.barrier()
        start = time.perf_counter()
        runtime.run([batch] * total, [0.0] * total)
        windows.append((start, time.perf_counter()))
    steps = [end for action, _, end in runtime.trace if action.kind == "S"]
    first_forward = min(s for action, s, _ in runtime.trace if action.kind == "F")
    # Framework time per action besides the blocks, to calibrate the simulator.
    schedule = runtime.schedule(1)
    predicted = action_costs(schedule, args.block_costs)
    over = {kind: [e - s - predicted(a) for a, s, e in runtime.trace if a.kind == kind]
            for kind in ("F", "B", "W")}  # fmt: skip
    return {
        "step_times": step_times, "windows": windows, "step_ends": steps,
        "first_forward": first_forward, "peak": runtime.engine.memory.peak_bytes,
        "actions": [(s, e) for a, s, e in runtime.trace if a.kind in ("F", "B", "W")],
        "overhead": tuple(statistics.median(o) if o else 0.0 for o in over.values()),
        # the stage that reaches a step last waits least: its duration is the step's own cost
        "step_durations": [e - s for a, s, e in runtime.trace if a.kind == "S"],
    }  # fmt: skip


def _run_baseline(case: Case, args, recorder: emulate.Recorder) -> dict:
    from . import baselines

    T, cost = _blocks(args), args.cost_ms / 1000
    blocks = max(T, args.stages * baselines.stages_per_rank(case.policy))
    # Same per-rank compute for every system: emulated, a rank holding two stages of one block
    # runs them at half cost; real blocks are the same blocks, two stages of T / 2P each.
    per_block = cost * T / blocks

    made: list[nn.Module] = []

    def make_block(i: int):
        if args.real:
            block = _real_block(args, i)
        else:
            block = emulate.EmulatedBlock(args.width, i, per_block, per_block, per_block, recorder)
        made.append(block)
        return block

    # weights saved for backward are not activations (as in our engine's accounting)
    meter = ActivationMemory(lambda: [p for block in made for p in block.parameters()])
    shape = (args.microbatch_size, args.width)
    common = dict(make_block=make_block, num_blocks=blocks, microbatch_shape=shape,
                  num_microbatches=case.microbatches, steps=args.steps, warmup=args.warmup,
                  around_step=meter.hooks)  # fmt: skip
    if case.system == "torch":
        result = baselines.run_torch_pipelining(case.policy, **common)
    else:
        result = baselines.run_deepspeed_pipeline(**common)
    return {"step_times": result.step_times, "windows": result.windows, "step_ends": [],
            "first_forward": None, "peak": meter.peak_bytes}  # fmt: skip


def _batch(args, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = args.microbatch_size * m
    return torch.randn(n, args.width, generator=g), torch.randint(0, 10, (n,), generator=g)


def _measure_latency(args, rank: int, rounds: int = 30) -> float:
    """One-way time of an activation-sized message between neighbouring stages (ping-pong)."""
    buffer = torch.zeros(args.microbatch_size, args.width)
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


def worker(args: argparse.Namespace) -> None:
    """Runs on every rank (started by torchrun); rank 0 writes the report."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    topology = Topology(args.stages, 1, rank)
    groups = Groups.create(topology)
    args.latency_ms = _measure_latency(args, rank)
    args.block_costs = _costs(args)
    if rank == 0:
        console.print(f"measured message latency {args.latency_ms:.2f} ms (used by the simulator)")
        c, how = args.block_costs, "measured" if args.real else "emulated"
        console.print(f"per block ({how}): F {1000 * c.forward:.2f} ms, B "
                      f"{1000 * c.input_grad:.2f} ms, W {1000 * c.weight_grad:.2f} ms")  # fmt: skip
    results, recorder = [], emulate.Recorder()
    for case in cases(args):
        recorder.take()
        recorder.recording = True
        try:
            measured = _run_ours(case, args, groups, recorder) if case.system == "ours" else (
                _run_baseline(case, args, recorder))  # fmt: skip
            error = None
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            measured, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        recorder.recording = False
        trace = recorder.take()
        gathered: list = [None] * args.stages
        dist.all_gather_object(gathered, (measured, trace, error))
        if rank == 0:
            results.append(_summarize(case, gathered, args))
            _print_row(results[-1])
        dist.barrier()
    if rank == 0:
        _finish(results, args)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- metrics


def _summarize(case: Case, gathered: list, args) -> Result:
    errors = [g[2] for g in gathered if g[2]]
    result = Result(case)
    if errors:
        result.case.name += f" (failed: {errors[0]})"
        return result
    P = args.stages
    per_rank = [g[0] for g in gathered]
    traces = [g[1] for g in gathered]
    result.trace = [(k, kind, s, e) for k, tr in enumerate(traces) for kind, _, s, e in tr]
    compute = [[(s, e) for _, _, s, e in tr] for tr in traces]
    # Our runtime timestamps every action; for the baselines the blocks' compute is all we see.
    actions = [r.get("actions") or c for r, c in zip(per_rank, compute, strict=True)]
    if case.mode == "async":
        start = max(r["windows"][0][0] for r in per_rank)
        ends = [r["step_ends"] for r in per_rank]
        result.time_per_minibatch, window = steady_state(ends, args.warmup, start)
        result.bubble, result.compute_bubble = (
            [1 - busy_time(iv, window) / (window[1] - window[0]) for iv in kind]
            for kind in (actions, compute)
        )
        start = min(r["windows"][0][0] for r in per_rank)
        result.fill = per_rank[-1]["first_forward"] - start
    else:
        times = [max(r["step_times"][i] for r in per_rank) for i in range(args.steps)]
        result.time_per_minibatch = statistics.median(times)
        windows = [
            (min(r["windows"][i][0] for r in per_rank), max(r["windows"][i][1] for r in per_rank))
            for i in range(args.steps)
        ]
        result.bubble, result.compute_bubble = (
            [statistics.mean(1 - busy_time(iv, w) / (w[1] - w[0]) for w in windows) for iv in kind]
            for kind in (actions, compute)
        )
    if args.real:  # real blocks are not timestamped: only our runtime's actions are
        result.compute_bubble = []
        result.bubble = result.bubble if case.system == "ours" else []
    result.samples_per_s = args.microbatch_size * case.microbatches / result.time_per_minibatch
    result.peak_mib = [r["peak"] / 2**20 for r in per_rank]
    calibration = (0.0, 0.0, 0.0, 0.0)
    if case.system == "ours":  # framework time per F, B, W action and per step, as measured
        overheads = [r["overhead"] for r in per_rank]
        steps = zip(*(r["step_durations"] for r in per_rank), strict=True)
        calibration = (
            *(statistics.median(o[k] for o in overheads) for k in range(3)),
            statistics.median(min(durations) for durations in steps),
        )
    _simulate_case(result, args, P, calibration)
    return result


def _simulated_schedule(case: Case, args):
    T = _blocks(args)
    if case.system == "ours":
        plan = Plan(case.rule, case.horizon or T, T)
        policy = case.policy
    elif case.policy in ("Schedule1F1B", "1f1b"):
        plan, policy = Plan("receding", T, T), "1f1b"
    elif case.policy == "ScheduleGPipe":
        plan, policy = Plan("receding", T, T), "gpipe"
    else:
        return None, None
    minibatches = args.warmup + args.steps if case.mode == "async" else 1
    ranges = stage_ranges([args.blocks_per_stage] * args.stages)
    return generate(
        plan, ranges, case.microbatches, minibatches, case.mode, policy, case.defer
    ), minibatches


def _simulate_case(result: Result, args, P: int, overhead: tuple[float, ...]) -> None:
    schedule, minibatches = _simulated_schedule(result.case, args)
    if schedule is None:
        return
    costs = dataclasses.replace(
        args.block_costs, step=overhead[3], latency=args.latency_ms / 1000,
        forward_overhead=overhead[0], backward_overhead=overhead[1], weight_overhead=overhead[2],
    )  # fmt: skip
    result.overhead_ms = tuple(1000 * o for o in overhead[:3])
    events = simulate(schedule, costs)
    compute = [e for e in events if e.action.kind in COMPUTE]
    if result.case.mode == "async":
        ends = [[e.end for e in compute if e.stage == k and e.action.kind == "S"] for k in range(P)]
        result.simulated_time, (lo, hi) = steady_state(ends, args.warmup)
    else:
        lo, hi = 0.0, max(e.end for e in events)
        result.simulated_time = hi
    result.simulated_bubble = [
        1 - busy_time([(e.start, e.end) for e in compute if e.stage == k and e.action.kind != "S"],
                      (lo, hi)) / (hi - lo)
        for k in range(P)
    ]  # fmt: skip


# ----------------------------------------------------------------------------- outputs


def _print_row(r: Result) -> None:
    def pct(values) -> str:
        return f"{100 * statistics.mean(values):5.1f}%" if values else "  n/a "

    peak = f"{max(r.peak_mib):6.1f} MiB" if r.peak_mib else "   n/a    "
    console.print(
        f"m={r.case.microbatches:<3} {r.case.name:<38} {1000 * r.time_per_minibatch:8.1f} ms "
        f"{r.samples_per_s:7.0f}/s  bubble {pct(r.bubble)} sim {pct(r.simulated_bubble)} "
        f"compute-only {pct(r.compute_bubble)}  peak {peak}",
        soft_wrap=True,
    )


def _finish(results: list[Result], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for m in args.microbatches:
        here = [r for r in results if r.case.microbatches == m and r.time_per_minibatch]
        torch_runs = [r for r in here if r.case.system == "torch"]
        one_f_one_b = next((r for r in torch_runs if r.case.policy == "Schedule1F1B"), None)
        best = min(torch_runs, key=lambda r: r.time_per_minibatch, default=None)
        for r in here:
            if one_f_one_b:
                r.vs_torch_1f1b = one_f_one_b.time_per_minibatch / r.time_per_minibatch
            if best:
                r.vs_best_torch = best.time_per_minibatch / r.time_per_minibatch
    rows = [_row(r) for r in results]
    with (out / "bench.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.md").write_text(_markdown(rows, args))
    (out / "bench.json").write_text(
        json.dumps(
            {
                "args": {**vars(args), "block_costs": asdict(args.block_costs)},
                "results": [{**asdict(r), "trace": None} for r in results],
            },  # fmt: skip
            indent=1,
        )
    )
    from .plots import gantt, horizon_sweep, throughput_vs_memory

    for r in results:
        if r.trace:
            slug = f"m{r.case.microbatches}_" + (
                r.case.name.split(" (failed")[0].replace(" ", "_").replace("=", "")
                .replace("+", "plus")
            )  # fmt: skip
            _chrome_trace(r, out / "traces" / f"{slug}.json")
            gantt(r.trace, args.stages, out / "gantt" / f"{slug}.png",
                  f"{r.case.name}, m = {r.case.microbatches}")  # fmt: skip
    for m in args.microbatches:
        mine = [row for row in rows if row["microbatches"] == m]
        horizon_sweep(mine, out / f"horizon_sweep_m{m}.png", f"P = {args.stages}, m = {m}")
        throughput_vs_memory(mine, out / f"throughput_vs_memory_m{m}.png",
                             f"P = {args.stages}, m = {m}")  # fmt: skip
    console.print(
        f"\nwrote {out}/: bench.md, bench.csv, traces/*.json (Perfetto), gantt/*.png, "
        "horizon_sweep_m*.png, throughput_vs_memory_m*.png"
    )


def _row(r: Result) -> dict:
    def pct(values):
        return round(100 * statistics.mean(values), 2) if values else ""

    return {
        "configuration": r.case.name, "system": r.case.system, "microbatches": r.case.microbatches,
        "rule": r.case.rule, "horizon": r.case.horizon or "", "mode": r.case.mode,
        "deferred_weights": r.case.defer,
        "ms_per_minibatch": round(1000 * r.time_per_minibatch, 2),
        "samples_per_s": round(r.samples_per_s, 1),
        "speedup_vs_best_torch": round(r.vs_best_torch, 3),
        "speedup_vs_torch_1f1b": round(r.vs_torch_1f1b, 3),
        "peak_activation_mib_max": round(max(r.peak_mib), 2) if r.peak_mib else "",
        "bubble_pct": pct(r.bubble), "simulated_bubble_pct": pct(r.simulated_bubble),
        "compute_bubble_pct": pct(r.compute_bubble),
        "overhead_ms_per_F_B_W": " ".join(f"{o:.2f}" for o in r.overhead_ms),
        "simulated_ms_per_minibatch": round(1000 * r.simulated_time, 2) if r.simulated_time else "",
        "fill_ms": round(1000 * r.fill, 1) if r.fill is not None else "",
        "bubble_per_stage_pct": " ".join(f"{100 * b:.1f}" for b in r.bubble),
        "peak_activation_mib_per_stage": " ".join(f"{m:.2f}" for m in r.peak_mib),
    }  # fmt: skip


def _markdown(rows: list[dict], args) -> str:
    cols = ["configuration", "ms_per_minibatch", "samples_per_s", "speedup_vs_best_torch",
            "speedup_vs_torch_1f1b", "peak_activation_mib_max", "bubble_pct",
            "simulated_bubble_pct", "compute_bubble_pct", "fill_ms"]  # fmt: skip
    c = args.block_costs
    blocks = (
        f"real residual MLP blocks ({args.width} -> {args.hidden}, one thread per process; "
        f"measured F {1000 * c.forward:.2f}, B {1000 * c.input_grad:.2f}, W "
        f"{1000 * c.weight_grad:.2f} ms per block)"
        if args.real else f"emulated F = B = W = {args.cost_ms} ms per block"
    )  # fmt: skip
    lines = [
        f"P = {args.stages} stages of {args.blocks_per_stage} block(s), microbatches of "
        f"{args.microbatch_size} x {args.width}, {blocks}, {args.steps} measured steps after "
        f"{args.warmup} warm-up.",
    ]
    for m in args.microbatches:
        lines += ["", f"### m = {m}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |"
                  for row in rows if row["microbatches"] == m]  # fmt: skip
    return "\n".join(lines) + "\n"


def _chrome_trace(r: Result, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    start = min(s for _, _, s, _ in r.trace)
    events = [
        {"name": kind, "ph": "X", "pid": 0, "tid": stage, "ts": 1e6 * (s - start),
         "dur": 1e6 * (e - s), "cat": kind}
        for stage, kind, s, e in r.trace
    ]  # fmt: skip
    for k in sorted({t[0] for t in r.trace}):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": k,
                       "args": {"name": f"stage {k}"}})  # fmt: skip
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--microbatches", type=ints, help="m values (default: P,4P)")
    parser.add_argument("--microbatch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024, help="activation width (real tensors)")
    parser.add_argument(
        "--real", action="store_true", help="real residual MLP blocks instead of emulated ones"
    )
    parser.add_argument("--hidden", type=int, default=2048, help="--real: MLP hidden width")
    parser.add_argument("--blocks-per-stage", type=int, default=1)
    parser.add_argument("--cost-ms", type=float, default=30.0, help="F = B = W per block")
    parser.add_argument("--latency-ms", type=float, default=0.5, help="simulator message latency")
    parser.add_argument("--horizons", type=ints, default=[1, 2, 3, 4])
    parser.add_argument(
        "--defer-horizons", type=ints, default=[2], help="also run these h with deferred W"
    )
    parser.add_argument("--rules", type=lambda s: s.split(","), default=["receding", "shrinking"])
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["sync", "async"])
    parser.add_argument(
        "--systems", type=lambda text: text.split(","), default=list(SYSTEMS),
        help=f"baselines (default all): {', '.join(SYSTEMS)}; none for ours only",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="runs/bench")


def main(args: argparse.Namespace) -> None:
    """Start one process per stage with torchrun; each runs ``worker``."""
    unknown = sorted(set(args.systems) - set(SYSTEMS) - {"none"})
    if unknown:
        raise SystemExit(f"mpc-dist bench: --systems {','.join(unknown)}: use {', '.join(SYSTEMS)} "
                         "or none")  # fmt: skip
    looped = sorted(set(args.systems) - {"1f1b", "gpipe", "deepspeed", "none"})
    if args.real and looped and args.blocks_per_stage % 2:
        raise SystemExit(
            f"mpc-dist bench: --real with {','.join(looped)} (two stages per rank) needs an "
            "even --blocks-per-stage, so that every system runs the same blocks"
        )
    args.microbatches = args.microbatches or [args.stages, 4 * args.stages]
    forwarded = []
    for key, value in vars(args).items():
        if key in ("command", "run"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            forwarded += [flag] if value else []
        else:
            forwarded += [
                flag,
                ",".join(map(str, value)) if isinstance(value, list) else str(value),
            ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.stages}", "-m", __name__, *forwarded]  # fmt: skip
    started = time.perf_counter()
    code = subprocess.call(command, env=env)
    console.print(f"bench finished in {time.perf_counter() - started:.0f} s")
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with contextlib.suppress(KeyboardInterrupt):
        worker(parser.parse_args())
