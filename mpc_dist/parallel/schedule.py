"""Pipeline schedules as data: per-stage ordered lists of actions (``actions.py``), what they
were generated for (``ScheduleSpec``), and a drawing of them.

``simulate.py`` executes a schedule as the runtime would, with any costs: the validator uses it
to prove a schedule deadlock-free, ``str(schedule)`` to draw it, the bubble benchmark and
``mpc-dist simulate`` to predict timelines. ``rendezvous.py`` checks a schedule against NCCL's
rendezvous sends. Schedules are made in ``generate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from ..core import Plan, PlanPart
from .actions import Action, Message
from .simulate import simulate, unit_costs

Mode = Literal["sync", "async"]
Policy = Literal["horizon", "1f1b", "gpipe"]


@dataclass(frozen=True)
class ScheduleSpec:
    """How a schedule is generated: the one option type of the generator, the runtime, the
    selector and the benchmarks."""

    num_microbatches: int = 1  # per minibatch, on each replica
    mode: Mode = "sync"  # sync (flush and step together per minibatch) | async (spec section 4)
    policy: Policy | Literal["auto"] = "horizon"  # auto: horizon (the config's default)
    defer_weights: bool = False  # zero-bubble split: weight gradients as deferred W actions

    def __post_init__(self) -> None:
        if self.policy == "auto":  # resolved here, once
            object.__setattr__(self, "policy", "horizon")


@dataclass
class Schedule:
    spec: ScheduleSpec
    plan: Plan
    ranges: list[tuple[int, int]]
    num_minibatches: int
    actions: list[list[Action]] = field(default_factory=list)  # per stage, lowered

    @property
    def name(self) -> str:
        return self.spec.policy

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def num_microbatches(self) -> int:
        return self.spec.num_microbatches

    @property
    def defer_weights(self) -> bool:
        return self.spec.defer_weights

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    @cached_property
    def stages(self) -> list[PlanPart]:
        """What each stage holds and which streams enter, start in and leave it (derived once)."""
        return [self.plan.part(first, last) for first, last in self.ranges]

    def compute(self, stage: int) -> list[Action]:
        return [a for a in self.actions[stage] if a.kind.is_compute]

    def send_order(self, stage: int, to: int) -> list[Message]:
        """Messages ``stage`` sends to ``to``, in order: the receiver posts its receives in it."""
        return [a.message for a in self.actions[stage] if a.kind.is_send and a.peer == to]

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
        legend = (
            "F<mb>.<micro> forward, B<mb>.<micro>s<stream> backward of stream s, W its "
            "deferred weight gradients, G second forward pass, S step"
        )
        rows = [header, legend]
        for stage in range(self.num_stages):
            cells = ["." * (width - 1)] * int(round(end))
            for event in timeline:
                if event.stage == stage and event.action.kind.is_compute:
                    for slot in range(int(round(event.start)), int(round(event.end))):
                        cells[slot] = _cell(event.action)
            rows.append(f"stage {stage}: " + " ".join(c.ljust(width - 1) for c in cells))
        return "\n".join(rows)


def _cell(action: Action) -> str:
    return str(action)[len(str(action.stage)) :]
