"""`mpc-dist simulate`: project our schedules and the BP baselines to large pipelines.

Uses the discrete-event simulator of ``mpc_dist.parallel`` on the very schedules the runtime
executes, with per-block costs given on the command line or read from a bench run (``bench.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..core import Plan
from ..parallel import Costs, bubble_fraction, generate, simulate, stage_ranges, steady_state
from ..train.metrics import console


def project(
    stages: int,
    microbatches: int,
    horizon: int,
    rule: str,
    mode: str,
    policy: str,
    costs: Costs,
    minibatches: int = 4,
) -> tuple[float, float]:
    """(time per minibatch, bubble) of one configuration over a few minibatches."""
    plan = Plan(rule, horizon, stages)
    schedule = generate(plan, stage_ranges([1] * stages), microbatches, minibatches, mode, policy)
    events = simulate(schedule, costs)
    if mode == "sync":
        return max(e.end for e in events) / minibatches, bubble_fraction(events)
    ends = [[e.end for e in events if e.stage == k and e.action.kind == "S"] for k in range(stages)]
    return steady_state(ends, warmup=0)[0], bubble_fraction(events)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--stages", type=ints, default=[8, 16, 32, 64])
    parser.add_argument("--microbatches", type=int, default=0, help="m (default: = stages)")
    parser.add_argument("--horizons", type=ints, default=[1, 2, 4])
    parser.add_argument("--rules", type=lambda s: s.split(","), default=["receding", "shrinking"])
    parser.add_argument("--forward-ms", type=float, default=1.0)
    parser.add_argument("--input-grad-ms", type=float, default=1.0)
    parser.add_argument("--weight-grad-ms", type=float, default=1.0)
    parser.add_argument("--latency-ms", type=float, default=0.02, help="per message")
    parser.add_argument("--from-bench", help="take costs from a bench.json of `mpc-dist bench`")


def main(args: argparse.Namespace) -> None:
    f, b, w, latency = args.forward_ms, args.input_grad_ms, args.weight_grad_ms, args.latency_ms
    if args.from_bench:
        recorded = json.loads(Path(args.from_bench).read_text())["args"]
        f = b = w = recorded["cost_ms"]
        latency = recorded["latency_ms"]
    costs = Costs(f, b, w, latency=latency)
    console.print(f"per block: F {f} ms, B {b} ms, W {w} ms; message latency {latency} ms")
    header = f"{'configuration':<24}{'ms/minibatch':>13}{'vs BP-1F1B':>11}{'bubble':>8}"
    console.print(f"{'P':>3} {'m':>3}  {header}")
    for P in args.stages:
        m = args.microbatches or P
        started = time.perf_counter()
        bp_time, bp_bubble = project(P, m, P, "receding", "sync", "1f1b", costs)
        console.print(
            f"{P:>3} {m:>3}  {'BP-1F1B':<24}{bp_time:>13.1f}{1.0:>11.2f}{bp_bubble:>8.1%}"
        )
        for rule in args.rules:
            for h in args.horizons:
                if h >= P or (rule == "shrinking" and h == 1):
                    continue
                for mode in ("sync", "async"):
                    t, bubble = project(P, m, h, rule, mode, "horizon", costs)
                    name = f"{rule} h={h} {mode}"
                    console.print(
                        f"{P:>3} {m:>3}  {name:<24}{t:>13.1f}{bp_time / t:>11.2f}{bubble:>8.1%}"
                    )
        console.print(f"    ({time.perf_counter() - started:.1f} s to simulate P = {P})")
