"""Executing schedules with costs: the discrete-event simulator and the measures read off its
timelines (bubbles, held microbatches, steady state).

A schedule runs as the runtime runs it: a receive waits for its send (plus latency), sends never
block, a sync step is a collective of all stages. Costs are per block (forward, input gradient,
weight gradient) plus per-action framework time and message latency.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

from ..core import PlanPart, Stream
from .actions import Action, ActionKind, ScheduleError

if TYPE_CHECKING:
    from .schedule import Schedule


@dataclass
class Costs:
    """Seconds (or units) per block: forward, input-gradient, weight-gradient; plus messages."""

    forward: float = 1.0
    input_grad: float = 1.0
    weight_grad: float = 1.0
    step: float = 0.0
    latency: float = 0.0  # per message
    forward_overhead: float = 0.0  # per F action (framework time besides the blocks)
    backward_overhead: float = 0.0  # per B action
    weight_overhead: float = 0.0  # per W action


def unit_costs(schedule: Schedule) -> Callable[[Action], float]:
    return action_costs(schedule, Costs())


def action_costs(schedule: Schedule, costs: Costs) -> Callable[[Action], float]:
    infos = schedule.stages
    plan = schedule.plan

    def cost(action: Action) -> float:
        info = infos[action.stage]
        if action.kind == ActionKind.F:
            return costs.forward * (info.last - info.first) + costs.forward_overhead
        if action.kind == ActionKind.G:  # a forward pass and the weight updates
            blocks = info.last - info.first
            return (costs.forward + costs.weight_grad) * blocks + costs.forward_overhead
        if action.kind in (ActionKind.B, ActionKind.W):
            inputs, weights = backward_costs(plan.stream(action.stream), info, costs)
            if not schedule.defer_weights:
                return inputs + weights + costs.backward_overhead
            if action.kind == ActionKind.B:
                return inputs + costs.backward_overhead
            return weights + costs.weight_overhead
        if action.kind == ActionKind.S:
            return costs.step
        return 0.0

    return cost


def backward_costs(stream: Stream, info: PlanPart, costs: Costs) -> tuple[float, float]:
    """One stream through one stage: (input gradients where it passes on, weight gradients
    where it trains)."""
    blocks = range(max(stream.low, info.first), min(stream.loss_point, info.last))
    inputs = sum(costs.input_grad for t in blocks if t > stream.low and t > 0)
    return inputs, sum(costs.weight_grad for t in blocks if stream.trains(t))


@dataclass
class Event:
    stage: int
    action: Action
    start: float
    end: float


def simulate(schedule: Schedule, cost: Callable[[Action], float] | Costs) -> list[Event]:
    """Execute every stage's list in order, as the runtime does.

    A receive waits for its send (plus latency); sends never block; a sync step is a collective
    of all stages. Raises ScheduleError naming the blocked actions if the schedule deadlocks.
    """
    if isinstance(cost, Costs):
        latency = cost.latency
        cost = action_costs(schedule, cost)
    else:
        latency = 0.0
    P = schedule.num_stages
    position = [0] * P
    clock = [0.0] * P
    sent: dict[tuple, float] = {}
    events: list[Event] = []
    arrived: dict[int, dict[int, float]] = defaultdict(dict)  # sync step -> arrivals
    progress = True
    while progress:
        progress = False
        for k in range(P):
            while position[k] < len(schedule.actions[k]):
                a = schedule.actions[k][position[k]]
                start = clock[k]
                if a.kind.is_receive:
                    key = (a.peer, a.message)
                    if key not in sent:
                        break
                    start = max(start, sent[key] + latency)
                elif a.kind == ActionKind.S and schedule.mode == "sync" and P > 1:
                    waiting = arrived[a.minibatch]  # stage -> its clock on arrival
                    waiting.setdefault(k, clock[k])
                    if len(waiting) < P:
                        break
                    start = max(waiting.values())  # the flush: everyone steps together
                end = start + cost(a)
                if a.kind.is_send:
                    sent[(k, a.message)] = end
                events.append(Event(k, a, start, end))
                clock[k] = end
                position[k] += 1
                progress = True
    if any(position[k] < len(schedule.actions[k]) for k in range(P)):
        blocked = {
            k: str(schedule.actions[k][position[k]])
            for k in range(P)
            if position[k] < len(schedule.actions[k])
        }
        raise ScheduleError(f"deadlock: stages blocked at {blocked}")
    return events


def bubble_fraction(events: list[Event], stage: int | None = None) -> float:
    """Idle share of [0, makespan] over compute actions, for one stage or all of them."""
    end = max(e.end for e in events)
    stages = {e.stage for e in events} if stage is None else {stage}
    busy = sum(e.end - e.start for e in events if e.stage in stages and e.action.kind.is_compute)
    return 1.0 - busy / (end * len(stages))


def held_microbatches(schedule: Schedule) -> list[int]:
    """Per stage, the most microbatches held at once in the schedule's order: forwarded, with a
    stream still to pass (or deferred weight gradients still to take). Activation memory is
    that many microbatches' worth."""
    peaks = []
    for k in range(schedule.num_stages):
        work: dict[tuple, int] = defaultdict(int)  # B and W actions per microbatch
        for action in schedule.compute(k):
            if action.kind.is_work:
                work[(action.minibatch, action.microbatch)] += 1
        left: dict[tuple, int] = {}
        peak = 0
        for action in schedule.compute(k):
            key = (action.minibatch, action.microbatch)
            if action.kind == ActionKind.F:
                left[key] = work[key]
            elif action.kind.is_work:
                left[key] -= 1
            peak = max(peak, sum(1 for n in left.values() if n > 0))
        peaks.append(peak)
    return peaks


def steady_state(
    step_ends: list[list[float]], warmup: int, start: float = 0.0
) -> tuple[float, tuple[float, float]]:
    """Async time per minibatch and the steady-state window, from each stage's step end times.

    The window opens once every stage has finished its ``warmup`` minibatches (at ``start``
    without warm-up) and closes when the first stage has finished all; the time per minibatch is
    the median gap between consecutive steps of a stage after warm-up, over all stages.
    """
    low = max(ends[warmup - 1] for ends in step_ends) if warmup else start
    high = min(ends[-1] for ends in step_ends)
    gaps = [b - a for ends in step_ends for a, b in pairwise(ends[max(warmup - 1, 0) :])]
    return statistics.median(gaps), (low, high)


def busy_time(intervals: list[tuple[float, float]], window: tuple[float, float]) -> float:
    """Seconds of ``intervals`` inside ``window``."""
    low, high = window
    return sum(max(0.0, min(e, high) - max(s, low)) for s, e in intervals)
