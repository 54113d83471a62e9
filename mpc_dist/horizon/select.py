"""Choosing the horizon (and the rule) for a user's objective (spec section 7).

Every candidate (rule, h) is measured on the user's model, data and device: its alignment with
back-propagation (``alignment.probe``; the law 1 - cos^2 = c (1 - h/T)^p is fitted to it), its
short-run progress (the decrease of the held-out loss over a couple of hundred steps from the
same weights, relative to back-propagation's: alignment alone misjudges how neighbouring blocks'
objectives interact, see docs/horizon-study.md), its memory per device (the engine's saved-
activation accounting, times the microbatches the schedule keeps in flight; fitted as a h + b)
and its time per step (the pipeline simulator fed with the block's measured F, B and W costs: on
a pipeline h acts through bubbles, not only through work). The objectives:

* ``memory``: the best score within ``memory_budget_mib`` per device;
* ``speed``: the fastest step whose alignment cos^2 is at least ``min_alignment`` and whose
  progress is at least ``min_progress``;
* ``tradeoff``: the best score - ``penalty`` x (step time / back-propagation's step time).

The score is the measured progress when it was measured, else the predicted cos^2."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import get_args

import torch

from ..config import ConfigError, Objective
from ..core import EngineOptions, HorizonEngine, Plan
from ..core.costs import BlockCosts
from ..models import BlockModel
from ..parallel import (
    Costs,
    ScheduleSpec,
    generate,
    held_microbatches,
    simulate,
    stage_ranges,
    steady_state,
    uniform_partition,
)
from .alignment import Alignment, Batch, block_gradients, probe
from .laws import AlignmentLaw, LinearLaw, fit_alignment, fit_linear

OBJECTIVES: tuple[str, ...] = get_args(Objective)


@dataclass
class Candidate:
    rule: str
    horizon: int
    cos2: float  # measured alignment cos^2(theta_h)
    predicted_cos2: float  # from the fitted law
    progress: float | None  # loss decrease over a few steps, relative to back-propagation's
    memory_mib: float  # per device: activations held + weights, gradients, optimizer state
    step_ms: float  # simulated time per minibatch
    score: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.rule} h={self.horizon}"


@dataclass
class Selection:
    objective: str
    candidates: list[Candidate]
    law: AlignmentLaw
    memory_laws: dict[str, LinearLaw]
    choice: Candidate
    reason: str
    alignments: list[Alignment] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"{'candidate':<16}{'cos^2':>8}{'law':>8}{'progress':>10}{'memory MiB':>12}"
            f"{'step ms':>10}{'score':>8}"
        ]
        for c in self.candidates:
            progress = f"{c.progress:.3f}" if c.progress is not None else "-"
            mark = "  <- chosen" if c is self.choice else ""
            lines.append(
                f"{c.name:<16}{c.cos2:>8.3f}{c.predicted_cos2:>8.3f}{progress:>10}"
                f"{c.memory_mib:>12.1f}{c.step_ms:>10.2f}{c.score:>8.3f}{mark}"
            )
        return "\n".join(lines)


def candidate_horizons(num_blocks: int) -> list[int]:
    """1, 2, 4, ... and T: the horizons worth measuring."""
    hs, h = [], 1
    while h < num_blocks:
        hs.append(h)
        h *= 2
    return [*hs, num_blocks]


def loss_progress(
    model: BlockModel,
    plan: Plan,
    stream: Iterable[Batch],
    held_out: Sequence[Batch],
    make_optimizer: Callable[[BlockModel], torch.optim.Optimizer],
) -> float:
    """How much training under ``plan`` on ``stream`` (a minibatch a step) lowers the final loss
    on ``held_out`` batches (from a copy of the model: the caller's weights stay as they are)."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    optimizer = make_optimizer(model)
    engine = HorizonEngine(model, plan, EngineOptions(track_memory=False))

    def final_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = statistics.fmean(
                float(torch.nn.functional.cross_entropy(model(x), y)) for x, y in held_out
            )
        model.train()
        return loss

    with torch.random.fork_rng(devices=[]):  # the same dropout for every candidate
        torch.manual_seed(0)
        before = final_loss()
        for x, y in stream:
            engine.train_microbatch(x, y)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return before - final_loss()


def off_zero(
    model: BlockModel,
    batches: Sequence[Batch],
    make_optimizer: Callable[[BlockModel], torch.optim.Optimizer],
) -> BlockModel:
    """``model``, or, where back-propagation's gradient is zero at these weights (a zero-initialised
    head, as torchvision's and timm's ViTs have, passes no gradient down), a copy after one
    back-propagation step: alignment is undefined at a zero gradient."""
    T = model.num_blocks
    if any(float(g.norm()) > 0 for g in block_gradients(model, Plan("receding", T, T), batches)):
        return model
    model = copy.deepcopy(model)
    optimizer = make_optimizer(model)
    HorizonEngine(
        model, Plan("receding", T, T), EngineOptions(track_memory=False)
    ).train_microbatch(*batches[0])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


def stage_activation_bytes(model: BlockModel, plan: Plan, ranges, sample: Batch) -> list[int]:
    """Bytes one microbatch leaves saved for backward on each stage (the engine's accounting);
    in one process, the peak of a whole microbatch's step."""
    x, y = sample
    if len(ranges) == 1:  # one process: streams run as soon as their loss is there
        engine = HorizonEngine(model, plan)
        engine.train_microbatch(x, y)
        model.zero_grad(set_to_none=True)
        return [engine.memory.peak_bytes]
    out = []
    for first, last in ranges:
        part = model.split(first, last, plan.reads_shared_head_below_top(model.head_mode))
        engine = HorizonEngine(part, plan)
        state = x
        with torch.no_grad():
            for t in range(first):
                state = model.block_forward(t, state)
        engine.forward(0, state, y, eager=False)
        out.append(engine.memory.current_bytes)
        del engine
    model.zero_grad(set_to_none=True)  # the heads' gradients of those forwards
    return out


def step_seconds(plan: Plan, ranges, spec: ScheduleSpec, costs: Costs) -> float:
    """Simulated time per minibatch of the schedule for ``plan``."""
    schedule = generate(plan, ranges, spec, 4)
    events = simulate(schedule, costs)
    if spec.mode == "sync":
        return max(e.end for e in events) / 4
    stages = len(ranges)
    ends = [[e.end for e in events if e.stage == k and e.action.kind == "S"] for k in range(stages)]
    return steady_state(ends, warmup=1)[0]


@dataclass
class Setting:
    """What the candidates are measured under."""

    stages: int = 1
    schedule: ScheduleSpec = ScheduleSpec()  # the run's (microbatches, mode, deferral)
    rules: tuple[str, ...] = ("receding", "shrinking")
    horizons: tuple[int, ...] = ()  # default: candidate_horizons(T)
    static_mib_per_device: float = 0.0  # weights, gradients, optimizer state per stage (mean)


def measure(
    model: BlockModel,
    batches: Sequence[Batch],
    block: BlockCosts,
    setting: Setting,
    make_optimizer: Callable[[BlockModel], torch.optim.Optimizer],
    stream: Callable[[], Iterable[Batch]] = lambda: (),
    held_out: Sequence[Batch] = (),
) -> tuple[list[Candidate], list[Alignment], AlignmentLaw, dict[str, LinearLaw]]:
    """Measure every candidate (see the module's docstring) on microbatches like ``batches``:
    alignment on ``batches``; progress (when there are ``held_out`` batches) by training on
    ``stream()`` (a fresh iterator per candidate) and scoring on ``held_out``; time by
    simulating with the measured ``block``'s costs for every block."""
    T = model.num_blocks
    costs = Costs(**asdict(block))
    model = off_zero(model, batches, make_optimizer)
    horizons = list(setting.horizons or candidate_horizons(T))
    alignments = probe(model, batches, horizons, setting.rules)
    misfit = [(a.horizon, a.misalignment) for a in alignments]
    law = fit_alignment([h for h, _ in misfit], [m for _, m in misfit], T)
    ranges = stage_ranges(uniform_partition(T, setting.stages))
    bp_progress = None
    if held_out:
        bp_progress = loss_progress(
            model, Plan("receding", T, T), stream(), held_out, make_optimizer
        )
    candidates = []
    for a in alignments:
        plan = Plan(a.rule, a.horizon, T)
        schedule = generate(plan, ranges, setting.schedule, 2)
        held = held_microbatches(schedule)
        saved = stage_activation_bytes(model, plan, ranges, batches[0])
        memory = max(h * s for h, s in zip(held, saved, strict=True)) / 2**20
        progress = None
        if bp_progress is not None and bp_progress > 1e-6:  # else: alignment decides
            mine = (
                bp_progress
                if a.horizon == T
                else loss_progress(model, plan, stream(), held_out, make_optimizer)
            )
            progress = mine / bp_progress
        candidates.append(
            Candidate(
                a.rule,
                a.horizon,
                max(a.cos, 0.0) ** 2,
                law.alignment(a.horizon, T),
                progress,
                memory + setting.static_mib_per_device,
                1000 * step_seconds(plan, ranges, setting.schedule, costs),
            )
        )
    memory_laws = {
        rule: fit_linear(
            [c.horizon for c in candidates if c.rule == rule],
            [c.memory_mib for c in candidates if c.rule == rule],
        )
        for rule in {c.rule for c in candidates}
    }
    return candidates, alignments, law, memory_laws


def choose(
    candidates: list[Candidate],
    objective: str,
    memory_budget_mib: float = 0.0,
    min_alignment: float = 0.0,
    penalty: float = 0.0,
    min_progress: float = 0.0,
) -> tuple[Candidate, str]:
    """The candidate the objective picks, and why; ConfigError (naming the field and the
    feasible value) when no candidate satisfies the constraint."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"horizon.objective={objective!r}: use one of {OBJECTIVES}")
    bp = max(candidates, key=lambda c: c.horizon)
    for c in candidates:
        c.score = c.progress if c.progress is not None else c.predicted_cos2
    what = "progress" if candidates[0].progress is not None else "predicted cos^2"
    if objective == "memory":
        fits = [c for c in candidates if c.memory_mib <= memory_budget_mib]
        if not fits:
            least = min(c.memory_mib for c in candidates)
            raise ConfigError(
                f"horizon.memory_budget_mib={memory_budget_mib:g}: no candidate fits; the "
                f"smallest feasible budget here is {least:.1f}"
            )
        best = max(fits, key=lambda c: (c.score, -c.memory_mib))
        return best, (
            f"best {what} ({best.score:.3f}) within {best.memory_mib:.1f} MiB <= "
            f"{memory_budget_mib:g} MiB per device"
        )
    if objective == "speed":
        fits = [c for c in candidates if c.cos2 >= min_alignment]
        if not fits:
            most = max(c.cos2 for c in candidates)
            raise ConfigError(
                f"horizon.min_alignment={min_alignment:g}: no candidate reaches it; the largest "
                f"feasible value here is {most:.3f}"
            )
        measured = candidates[0].progress is not None
        if measured:  # alignment alone misleads (docs/horizon-study.md): progress must hold too
            fits = [c for c in fits if c.progress >= min_progress] or [bp]
        best = min(fits, key=lambda c: (c.step_ms, -c.score))
        speedup = bp.step_ms / best.step_ms
        held = f" and progress {best.progress:.3f} >= {min_progress:g}" if measured else ""
        return best, (
            f"fastest step ({best.step_ms:.2f} ms, {speedup:.2f}x back-propagation's) "
            f"with cos^2 {best.cos2:.3f} >= {min_alignment:g}{held}"
        )
    for c in candidates:
        c.score -= penalty * c.step_ms / bp.step_ms
    best = max(candidates, key=lambda c: c.score)
    return best, (
        f"best {what} - {penalty:g} x relative step time ({best.score:.3f}; step "
        f"{bp.step_ms / best.step_ms:.2f}x faster than back-propagation)"
    )
