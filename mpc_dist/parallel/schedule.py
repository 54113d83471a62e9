"""Pipeline schedules as data (per-stage ordered lists of actions) and their simulation.

Compute actions are ``F`` (forward a microbatch through the stage, evaluating its loss points),
``B`` (run one stream of one microbatch through the stage; it deposits the weight gradients the
plan assigns to the stage's blocks on its way), ``W`` (with ``defer_weights``: B computes input
gradients only, and W the stream's weight gradients, later, wherever the stage would idle: the
zero-bubble split), ``G`` (a top-down rule's second forward pass, PEPITA's: the input modulated
by the error the last stage sent to the first, the stage's update from the two passes) and ``S``
(optimizer step). A lowering pass adds the messages: ``RF``/``SF`` receive/send an activation,
``RB``/``SB`` a stream's cotangent, ``RG``/``SG`` a second-pass activation, ``RT``/``ST`` the
top-down message from the last stage to the first. Each stream is its own unit of work (spec
section 3).

``simulate`` executes a schedule as the runtime would, with any costs: the validator uses it to
prove a schedule deadlock-free, ``str(schedule)`` to draw it, the bubble benchmark and
``mpc-dist simulate`` to predict timelines. Schedules are made in ``generate.py``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise

from ..core import Plan, PlanPart, Stream

COMPUTE = ("F", "B", "W", "G", "S")
SENDS = ("SF", "SB", "SG", "ST")
RECEIVES = ("RF", "RB", "RG", "RT")
# the process group a message travels on: up the pipeline (F) or down (B)
CHANNEL = {"F": "F", "G": "F", "B": "B", "T": "B"}


class ScheduleError(RuntimeError):
    pass


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: str  # F B W G S | RF SF RB SB RG SG RT ST
    minibatch: int = 0
    microbatch: int = 0
    stream: int = 0  # loss point, for B / W / RB / SB; the last stage, for RT / ST

    def __str__(self) -> str:
        if self.kind == "S":
            return f"{self.stage}S{self.minibatch}"
        where = f"{self.minibatch}.{self.microbatch}"
        if self.kind in ("B", "W", "RB", "SB"):
            where += f"s{self.stream}"
        return f"{self.stage}{self.kind}{where}"

    @property
    def message(self) -> tuple:
        """Identity of the message an RF/SF/RB/SB action moves (same on both ends)."""
        kind = self.kind[-1] if self.kind[-1] in "FGT" else "B"
        return (kind, self.minibatch, self.microbatch, self.stream)


@dataclass
class Schedule:
    name: str
    mode: str  # sync | async
    plan: Plan
    ranges: list[tuple[int, int]]
    num_microbatches: int
    num_minibatches: int
    actions: list[list[Action]] = field(default_factory=list)  # per stage, lowered
    defer_weights: bool = False  # B takes input gradients only; W actions take the weights

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    @cached_property
    def stages(self) -> list[PlanPart]:
        """What each stage holds and which streams enter, start in and leave it (derived once)."""
        return [self.plan.part(first, last) for first, last in self.ranges]

    def compute(self, stage: int) -> list[Action]:
        return [a for a in self.actions[stage] if a.kind in COMPUTE]

    def __str__(self) -> str:
        """A grid: one row per stage, one column per unit of time (unit costs)."""
        timeline = simulate(self, unit_costs(self))
        end = max(e.end for e in timeline)
        width = max(len(_cell(e.action)) for e in timeline) + 1
        header = (
            f"{self.name} ({self.mode}), {self.plan.rule} h={self.plan.horizon}, "
            f"{self.num_stages} stages x {self.plan.num_blocks} blocks, "
            f"{self.num_microbatches} microbatches x {self.num_minibatches} minibatches"
        )
        legend = ("F<mb>.<micro> forward, B<mb>.<micro>s<stream> backward of stream s, W its "
                  "deferred weight gradients, G second forward pass, S step")  # fmt: skip
        rows = [header, legend]
        for stage in range(self.num_stages):
            cells = ["." * (width - 1)] * int(round(end))
            for event in timeline:
                if event.stage == stage and event.action.kind in COMPUTE:
                    for slot in range(int(round(event.start)), int(round(event.end))):
                        cells[slot] = _cell(event.action)
            rows.append(f"stage {stage}: " + " ".join(c.ljust(width - 1) for c in cells))
        return "\n".join(rows)


def _cell(action: Action) -> str:
    return str(action)[len(str(action.stage)) :]


# ----------------------------------------------------------------------------- costs


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
        if action.kind == "F":
            return costs.forward * (info.last - info.first) + costs.forward_overhead
        if action.kind == "G":  # a forward pass and the weight updates
            blocks = info.last - info.first
            return (costs.forward + costs.weight_grad) * blocks + costs.forward_overhead
        if action.kind in ("B", "W"):
            inputs, weights = backward_costs(plan.stream(action.stream), info, costs)
            if not schedule.defer_weights:
                return inputs + weights + costs.backward_overhead
            if action.kind == "B":
                return inputs + costs.backward_overhead
            return weights + costs.weight_overhead
        if action.kind == "S":
            return costs.step
        return 0.0

    return cost


def backward_costs(stream: Stream, info: PlanPart, costs: Costs) -> tuple[float, float]:
    """One stream through one stage: (input gradients where it passes on, weight gradients
    where it trains)."""
    blocks = range(max(stream.low, info.first), min(stream.loss_point, info.last))
    inputs = sum(costs.input_grad for t in blocks if t > stream.low and t > 0)
    return inputs, sum(costs.weight_grad for t in blocks if stream.trains(t))


def backward_cost(stream: Stream, info: PlanPart, costs: Costs) -> float:
    """One stream through one stage, input and weight gradients together."""
    return sum(backward_costs(stream, info, costs))


def peer(action: Action) -> int:
    """The stage at the other end of a message action."""
    if action.kind == "ST":
        return 0
    if action.kind == "RT":
        return action.stream
    up = action.kind in ("SF", "RB", "SG")
    return action.stage + 1 if up else action.stage - 1


def send_order(schedule: Schedule, stage: int, to: int) -> list[tuple]:
    """Messages ``stage`` sends to ``to``, in order: the receiver posts its receives in it."""
    return [a.message for a in schedule.actions[stage] if a.kind in SENDS and peer(a) == to]


# ----------------------------------------------------------------------------- simulation


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
                if a.kind in RECEIVES:
                    key = (peer(a), a.message)
                    if key not in sent:
                        break
                    start = max(start, sent[key] + latency)
                elif a.kind == "S" and schedule.mode == "sync" and P > 1:
                    waiting = arrived[a.minibatch]  # stage -> its clock on arrival
                    waiting.setdefault(k, clock[k])
                    if len(waiting) < P:
                        break
                    start = max(waiting.values())  # the flush: everyone steps together
                end = start + cost(a)
                if a.kind in SENDS:
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
    busy = sum(e.end - e.start for e in events if e.stage in stages and e.action.kind in COMPUTE)
    return 1.0 - busy / (end * len(stages))


def held_microbatches(schedule: Schedule) -> list[int]:
    """Per stage, the most microbatches held at once in the schedule's order: forwarded, with a
    stream still to pass (or deferred weight gradients still to take). Activation memory is
    that many microbatches' worth."""
    peaks = []
    for k in range(schedule.num_stages):
        work: dict[tuple, int] = defaultdict(int)  # B and W actions per microbatch
        for action in schedule.compute(k):
            if action.kind in ("B", "W", "G"):
                work[(action.minibatch, action.microbatch)] += 1
        left: dict[tuple, int] = {}
        peak = 0
        for action in schedule.compute(k):
            key = (action.minibatch, action.microbatch)
            if action.kind == "F":
                left[key] = work[key]
            elif action.kind in ("B", "W", "G"):
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


# ----------------------------------------------------------------------------- messages as posted

RECEIVE_AHEAD = 4  # receives a rank posts ahead of need, per peer
MAX_PENDING_SENDS = 64  # sends in flight before a rank waits for the oldest


def comm_of(stage: int, peer_stage: int, kind: str, split: bool = True) -> tuple:
    """The communicator a message travels on: one per pair of stages and direction (``split``),
    or one per pair for both directions (what plain isend/irecv share under NCCL)."""
    pair = (min(stage, peer_stage), max(stage, peer_stage))
    return (*pair, CHANNEL[kind]) if split else pair


def check_rendezvous(
    schedule: Schedule,
    split: bool = True,
    window: int = RECEIVE_AHEAD,
    max_pending_sends: int = MAX_PENDING_SENDS,
) -> None:
    """Run every stage's list as the runtime posts its messages, with NCCL's semantics.

    Each communicator executes each rank's operations in the order that rank posted them, and a
    send completes only together with the matching receive (a rendezvous): both must have
    reached the head of their rank's queue. A rank posts a send when it reaches the send action
    and goes on; it posts receives in the peer's send order, up to ``window`` ahead of need,
    and waits at a receive action until that message has arrived; it waits for its oldest send
    when more than ``max_pending_sends`` are in flight; a sync step waits for every stage.
    Raises ScheduleError naming where each stage is stuck if the schedule cannot finish.
    """
    P = schedule.num_stages
    queues: dict[tuple, dict[int, deque]] = defaultdict(lambda: defaultdict(deque))
    expected = {(k, p): deque(send_order(schedule, p, k)) for k in range(P) for p in range(P)
                if p != k}  # fmt: skip
    unconsumed: dict[tuple, int] = defaultdict(int)  # (stage, peer) -> posted, not yet needed
    posted: set[tuple] = set()  # (stage, message) receives posted
    arrived: set[tuple] = set()  # (receiving stage, message)
    pending: list[deque] = [deque() for _ in range(P)]  # sends in flight per stage
    done_sends: set[tuple] = set()  # (sending stage, message)
    at_step: dict[int, set[int]] = defaultdict(set)
    position = [0] * P

    def post_receive(k: int, peer_stage: int, message: tuple) -> None:
        queues[comm_of(k, peer_stage, message[0], split)][k].append(("recv", message))
        posted.add((k, message))
        unconsumed[(k, peer_stage)] += 1

    def advance(k: int) -> bool:
        moved = False
        while position[k] < len(schedule.actions[k]):
            a = schedule.actions[k][position[k]]
            if pending[k] and len(pending[k]) > max_pending_sends:
                if (k, pending[k][0]) not in done_sends:
                    return moved
                pending[k].popleft()
                continue
            if a.kind in SENDS:
                queues[comm_of(k, peer(a), a.message[0], split)][k].append(("send", a.message))
                pending[k].append(a.message)
            elif a.kind in RECEIVES:
                source, message = peer(a), a.message
                while (k, message) not in posted:
                    post_receive(k, source, expected[(k, source)].popleft())
                while expected[(k, source)] and unconsumed[(k, source)] <= window:
                    post_receive(k, source, expected[(k, source)].popleft())
                if (k, message) not in arrived:
                    return moved
                unconsumed[(k, source)] -= 1
            elif a.kind == "S" and schedule.mode == "sync" and P > 1:
                at_step[a.minibatch].add(k)
                if len(at_step[a.minibatch]) < P:
                    return moved
            position[k] += 1
            moved = True
        return moved

    def match() -> bool:
        moved = False
        for comm, ends in queues.items():
            a, b = comm[0], comm[1]
            while ends[a] and ends[b]:
                (kind_a, msg_a), (kind_b, msg_b) = ends[a][0], ends[b][0]
                if msg_a != msg_b or kind_a == kind_b:
                    break
                ends[a].popleft(), ends[b].popleft()
                sender, receiver = (a, b) if kind_a == "send" else (b, a)
                done_sends.add((sender, msg_a))
                arrived.add((receiver, msg_a))
                moved = True
        return moved

    while any([advance(k) for k in range(P)]) | match():
        pass
    if any(position[k] < len(schedule.actions[k]) for k in range(P)):
        stuck = {k: str(schedule.actions[k][position[k]]) for k in range(P)
                 if position[k] < len(schedule.actions[k])}  # fmt: skip
        heads = {c: {k: q[0] for k, q in ends.items() if q} for c, ends in queues.items()}
        heads = {c: h for c, h in heads.items() if h}
        raise ScheduleError(f"deadlock under rendezvous sends: stages stuck at {stuck}; "
                            f"communicator queue heads {heads}")  # fmt: skip
