"""Engine overhead: time per training step of the horizon engine relative to plain autograd BP.

Same model, batch and optimizer for every configuration; configurations are timed in interleaved
rounds so drift in machine load affects all of them alike; the median round is reported. With
``--compile BACKEND`` every block is also measured compiled (``train.compile: blocks``) against
eager: its forward, input-gradient and weight-gradient times, and engine steps.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..console import console
from ..core import ActivationMemory, ComputeOptions, EngineOptions, HorizonEngine, Plan
from ..core.compile import CompileStats, compile_blocks
from ..core.costs import measure_model_block
from ..models import build_model

# Issue targets for the ratio to plain BP (a benchmark, read from the output).
TARGETS = {"bp": 1.10, "receding-2": 1.30, "shrinking": 1.15}


def _configurations(num_blocks: int) -> list[tuple[str, int]]:
    horizons = sorted({1, 2, num_blocks // 2, num_blocks})
    return [("receding", h) for h in horizons] + [("shrinking", h) for h in horizons if h > 1]


def _target(rule: str, horizon: int, num_blocks: int) -> float | None:
    if horizon == num_blocks:
        return TARGETS["bp"]
    if rule == "shrinking" or horizon == 1:  # receding h = 1 is shrinking h = 1
        return TARGETS["shrinking"]
    return TARGETS["receding-2"] if horizon == 2 else None


def main(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    spec = ModelConfig(
        name="residual_mlp", num_blocks=args.blocks, width=args.width, hidden=args.hidden
    )
    model = build_model(spec, (1, 28, 28), 10)
    eager_model = copy.deepcopy(model)  # before any engine compiles it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))

    def plain_step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"plain autograd BP": plain_step}
    engines = {}
    for rule, h in _configurations(args.blocks):
        engine = HorizonEngine(model, Plan(rule, h, args.blocks), EngineOptions(track_memory=False))
        engines[(rule, h)] = engine

        def engine_step(engine: HorizonEngine = engine) -> None:
            engine.train_microbatch(x, y)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[f"{rule} h={h}"] = engine_step

    times = _interleaved_times(steps, args.repeats, args.steps)
    base = statistics.median(times["plain autograd BP"])
    console.print(
        f"residual MLP T={args.blocks} width={args.width} hidden={args.hidden} "
        f"batch={args.batch_size}, {torch.get_num_threads()} threads; median of {args.repeats} "
        f"rounds x {args.steps} steps"
    )
    console.print(f"{'configuration':<22}{'ms/step':>9}{'vs BP':>8}{'target':>9}{'act. MiB':>10}")
    ratios = {}
    for name, samples in times.items():
        ms = 1000 * statistics.median(samples)
        ratio = statistics.median(samples) / base
        ratios[name] = ratio
        target, verdict, mib = "", "", ""
        if name != "plain autograd BP":
            rule, h = name.split(" h=")
            bound = _target(rule, int(h), args.blocks)
            if bound is not None:
                target = f"<={bound:.2f}"
                verdict = "  ok" if ratio <= bound else "  MISSED"
            mib = f"{_peak_activation_mib(engines[(rule, int(h))].plan, model, x, y):.1f}"
        console.print(f"{name:<22}{ms:>9.2f}{ratio:>8.2f}{target:>9}{mib:>10}{verdict}")
    if getattr(args, "compile", "none") != "none":
        compare_compiled(eager_model, x, y, args)
    return ratios


def compare_compiled(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> None:
    """Every block's F, B and W (ms, the engine's B/W split) eager and compiled, then engine
    steps (back-propagation and receding h = 2) eager and compiled, timed interleaved."""
    compiled = copy.deepcopy(model)
    compile_blocks(compiled, args.compile)
    before = CompileStats.now()
    HorizonEngine(compiled, Plan("receding", 2, args.blocks)).train_microbatch(x, y)
    HorizonEngine(compiled, Plan("receding", args.blocks, args.blocks)).train_microbatch(x, y)
    first = CompileStats.now().since(before)
    compiled.zero_grad(set_to_none=True)
    console.print(
        f"\ncompiled with {args.compile}: {first.graphs} graphs, {first.graph_breaks} graph "
        f"breaks, {first.seconds:.1f} s compiling (first calls)"
    )
    console.print(f"{'block':<7}{'eager F/B/W ms':>22}{'compiled F/B/W ms':>24}{'ratio':>7}")
    state = x
    for t in range(args.blocks):
        eager = measure_model_block(model, t, state, repeats=args.repeats, input_grad=t > 0)
        fast = measure_model_block(compiled, t, state, repeats=args.repeats, input_grad=t > 0)
        cells = [
            "/".join(f"{1000 * v:.2f}" for v in (c.forward, c.input_grad, c.weight_grad))
            for c in (eager, fast)
        ]
        console.print(f"{t:<7}{cells[0]:>22}{cells[1]:>24}{fast.total / eager.total:>7.2f}")
        with torch.no_grad():
            state = model.block_forward(t, state)
    steps = {}
    for name, part in (("eager", model), ("compiled", compiled)):
        optimizer = torch.optim.AdamW(part.parameters(), lr=1e-4)
        for h in (2, args.blocks):
            engine = HorizonEngine(
                part,
                Plan("receding", h, args.blocks),
                EngineOptions(ComputeOptions(), track_memory=False),
            )

            def step(engine=engine, optimizer=optimizer) -> None:
                engine.train_microbatch(x, y)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            steps[f"{name} receding h={h}"] = step
    times = _interleaved_times(steps, args.repeats, args.steps)
    for name, samples in times.items():
        console.print(f"{name:<28}{1000 * statistics.median(samples):>9.2f} ms/step")


def _interleaved_times(
    steps: dict[str, Callable[[], None]], repeats: int, count: int
) -> dict[str, list[float]]:
    """Seconds per step of every configuration in each of ``repeats`` rounds (a round times
    ``count`` steps of each after 3 warm-up steps), so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            for _ in range(3):  # warm-up
                step()
            start = time.perf_counter()
            for _ in range(count):
                step()
            times[name].append((time.perf_counter() - start) / count)
    return times


def _peak_activation_mib(plan: Plan, model, x, y) -> float:
    engine = HorizonEngine(model, plan)
    engine.train_microbatch(x, y)
    model.zero_grad(set_to_none=True)
    assert isinstance(engine.memory, ActivationMemory)
    return engine.memory.peak_bytes / 2**20
