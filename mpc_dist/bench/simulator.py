"""`mpc-dist simulate`: project our schedules and the BP baselines to large pipelines.

Uses the discrete-event simulator of ``mpc_dist.parallel`` on the very schedules the runtime
executes, with per-block costs given on the command line, read from a bench run (``bench.json``)
or measured here on a real model's block (``--model vit_b_16``: forward, input-gradient and
weight-gradient times of one block at ``--batch-size`` samples).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..console import console
from ..core import Plan
from ..parallel import (
    Costs,
    ScheduleSpec,
    bubble_fraction,
    generate,
    simulate,
    stage_ranges,
    steady_state,
)


def project(
    stages: int,
    microbatches: int,
    horizon: int,
    rule: str,
    mode: str,
    policy: str,
    costs: Costs,
    minibatches: int = 4,
    defer: bool = False,
) -> tuple[float, float]:
    """(time per minibatch, bubble) of one configuration over a few minibatches."""
    plan = Plan(rule, horizon, stages)
    ranges = stage_ranges([1] * stages)
    schedule = generate(plan, ranges, ScheduleSpec(microbatches, mode, policy, defer), minibatches)
    events = simulate(schedule, costs)
    if mode == "sync":
        return max(e.end for e in events) / minibatches, bubble_fraction(events)
    ends = [[e.end for e in events if e.stage == k and e.action.kind == "S"] for k in range(stages)]
    return steady_state(ends, warmup=0)[0], bubble_fraction(events)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--stages", type=ints, default=[8, 16, 32, 64])
    parser.add_argument("--microbatches", type=int, default=0, help="m (default: P and 4P)")
    parser.add_argument("--horizons", type=ints, default=[1, 2, 4])
    parser.add_argument("--rules", type=lambda s: s.split(","), default=["receding", "shrinking"])
    parser.add_argument("--forward-ms", type=float, default=1.0)
    parser.add_argument("--input-grad-ms", type=float, default=1.0)
    parser.add_argument("--weight-grad-ms", type=float, default=1.0)
    parser.add_argument("--latency-ms", type=float, default=0.02, help="per message")
    parser.add_argument("--from-bench", help="take costs from a bench.json of `mpc-dist bench`")
    parser.add_argument(
        "--model",
        help="measure F, B, W of one block of this model here "
        "(vit_b_16, vit_l_16, timm/vit_base_patch16_224, ...)",
    )
    parser.add_argument("--image-size", type=int, default=224, help="with --model")
    parser.add_argument("--batch-size", type=int, default=8, help="with --model: per microbatch")


def costs_from(args: argparse.Namespace) -> Costs:
    """Per-block costs in ms: given, read from a bench run, or measured on --model."""
    f, b, w, latency = args.forward_ms, args.input_grad_ms, args.weight_grad_ms, args.latency_ms
    if args.from_bench:
        recorded = json.loads(Path(args.from_bench).read_text())["args"]
        costs = recorded["block_costs"]  # emulated or, with --real, measured (seconds)
        f, b, w = (1000 * costs[k] for k in ("forward", "input_grad", "weight_grad"))
        latency = recorded["latency_ms"]
    if args.model:
        from ..config import ModelConfig
        from ..core.costs import model_block_costs

        spec = ModelConfig(name=args.model, image_size=args.image_size)
        size = (3, args.image_size, args.image_size)
        measured = model_block_costs(spec, size, args.batch_size)
        f, b, w = (1000 * c for c in (measured.forward, measured.input_grad, measured.weight_grad))
        console.print(
            f"measured one block of {args.model} at {args.batch_size} x {args.image_size} px, "
            f"float32, on this machine ({torch.get_num_threads()} threads)"
        )
    return Costs(f, b, w, latency=latency)


def main(args: argparse.Namespace) -> None:
    costs = costs_from(args)
    console.print(
        f"per block: F {costs.forward:.2f} ms, B {costs.input_grad:.2f} ms, W "
        f"{costs.weight_grad:.2f} ms; message latency {costs.latency} ms"
    )
    header = f"{'configuration':<28}{'ms/minibatch':>13}{'vs BP-1F1B':>11}{'bubble':>8}"
    console.print(f"{'P':>3} {'m':>4}  {header}")
    for P in args.stages:
        started = time.perf_counter()
        for m in [args.microbatches] if args.microbatches else [P, 4 * P]:
            project_row(P, m, args, costs)
        console.print(f"    ({time.perf_counter() - started:.1f} s to simulate P = {P})")


def project_row(P: int, m: int, args: argparse.Namespace, costs: Costs) -> None:
    """Our configurations at P stages and m microbatches, against BP-1F1B."""
    bp_time, _ = project(P, m, P, "receding", "sync", "1f1b", costs)
    rows = [
        ("BP-1F1B", P, "receding", "sync", "1f1b", False),
        ("BP-1F1B +W", P, "receding", "sync", "1f1b", True),
    ]
    for rule in args.rules:
        for h in args.horizons:
            if h < P and not (rule == "shrinking" and h == 1):
                rows += [
                    (f"{rule} h={h} {mode}", h, rule, mode, "horizon", False)
                    for mode in ("sync", "async")
                ]
    for name, h, rule, mode, policy, defer in rows:
        t, bubble = project(P, m, h, rule, mode, policy, costs, defer=defer)
        console.print(f"{P:>3} {m:>4}  {name:<28}{t:>13.1f}{bp_time / t:>11.2f}{bubble:>8.1%}")
