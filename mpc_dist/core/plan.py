"""Credit-assignment plans: which loss trains which block (spec section 2).

A plan is plain data. Stream ``s`` carries dl_s/dx backwards from the state x(s) down to block
``low`` and deposits weight gradients into ``weight_blocks`` on its way. Every block is in exactly
one stream's weight set, so every block has exactly one gradient source.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import get_args

from ..config import ConfigError, HorizonRule, LocalRule, TopDownRule

HORIZON_RULES: tuple[str, ...] = get_args(HorizonRule)
# Block-local rules: every block is trained by a loss at its own output, as at h = 1, and no
# signal crosses a block boundary backwards. What the loss is and how a block's gradient is
# formed (forward-forward goodness, forward gradients) is the rule's: ``mpc_dist.rules``.
LOCAL_RULES: tuple[str, ...] = get_args(LocalRule)
# Top-down rules: no stream at all; after the forward pass the last stage sends one message per
# microbatch to the first, and a second forward pass carries the updates (PEPITA).
TOP_DOWN_RULES: tuple[str, ...] = get_args(TopDownRule)
RULES = HORIZON_RULES + LOCAL_RULES + TOP_DOWN_RULES


def check_horizon(rule: str, horizon: int, num_blocks: int) -> None:
    """The one check of a rule and horizon; the message names the config field and the fix."""
    if rule not in RULES:
        raise ConfigError(f"horizon.rule={rule!r}: unknown rule; use one of {RULES}")
    if rule not in HORIZON_RULES and horizon != 1:
        raise ConfigError(
            f"horizon.horizon={horizon}: rule {rule} sends no signal back across blocks; set "
            f"horizon.horizon=1"
        )
    if not 1 <= horizon <= num_blocks:
        raise ConfigError(
            f"horizon.horizon={horizon}: must be in [1, {num_blocks}] (the model has {num_blocks} "
            f"blocks); horizon {num_blocks} is back-propagation"
        )


@dataclass(frozen=True)
class Stream:
    """The backward signal of loss point ``loss_point`` (x(s), 1 <= s <= T)."""

    loss_point: int
    low: int
    weight_blocks: tuple[int, ...]

    @property
    def blocks(self) -> range:
        """Blocks the stream passes, in the order it visits them (top down)."""
        return range(self.loss_point - 1, self.low - 1, -1)

    def passes(self, block: int) -> bool:
        return self.low <= block < self.loss_point

    def trains(self, block: int) -> bool:
        return block in self.weight_blocks


@dataclass(frozen=True)
class PlanPart:
    """Which streams start in, enter and leave a contiguous run of blocks [first, last)."""

    first: int
    last: int
    born: tuple[Stream, ...]  # loss point inside the run
    incoming: tuple[Stream, ...]  # arriving from the blocks above
    outgoing: tuple[Stream, ...]  # continuing to the blocks below

    @property
    def streams(self) -> tuple[Stream, ...]:
        """Every stream that passes the run, the arriving ones first."""
        return self.incoming + self.born


@dataclass(frozen=True)
class Plan:
    rule: str
    horizon: int
    num_blocks: int

    def __post_init__(self) -> None:
        check_horizon(self.rule, self.horizon, self.num_blocks)

    @cached_property
    def streams(self) -> tuple[Stream, ...]:
        """Streams in increasing loss point."""
        T, h = self.num_blocks, self.horizon
        if self.rule in LOCAL_RULES:
            return tuple(Stream(t + 1, t, (t,)) for t in range(T))
        if self.rule in TOP_DOWN_RULES:
            return ()
        if self.rule == "receding":
            # Block t is trained by l_{min(t+h, T)}: stream s < T trains block s-h only and
            # passes through s-1 .. s-h+1; stream T trains every block from T-h up.
            local = [Stream(s, s - h, (s - h,)) for s in range(h, T)]
            return (*local, Stream(T, T - h, tuple(range(T - h, T))))
        # shrinking: greedy groups of h blocks, each trained by the loss at its own end.
        groups = [range(start, min(start + h, T)) for start in range(0, T, h)]
        return tuple(Stream(g[-1] + 1, g[0], tuple(g)) for g in groups)

    @cached_property
    def loss_points(self) -> tuple[int, ...]:
        return tuple(s.loss_point for s in self.streams)

    def stream(self, loss_point: int) -> Stream:
        for s in self.streams:
            if s.loss_point == loss_point:
                return s
        raise KeyError(f"no stream at loss point {loss_point} in {self.rule} h={self.horizon}")

    def trainer_of(self, block: int) -> Stream:
        """The one stream whose loss trains ``block``."""
        (stream,) = (s for s in self.streams if s.trains(block))
        return stream

    def streams_through(self, block: int) -> tuple[Stream, ...]:
        return tuple(s for s in self.streams if s.passes(block))

    def crossing(self, boundary: int) -> tuple[Stream, ...]:
        """Streams whose cotangent crosses the state x(boundary) going down (none at 0 and T)."""
        return tuple(s for s in self.streams if s.low < boundary < s.loss_point)

    def part(self, first: int, last: int) -> PlanPart:
        """The streams of the blocks [first, last): a pipeline stage's or an engine's view."""
        return PlanPart(
            first,
            last,
            born=tuple(s for s in self.streams if first < s.loss_point <= last),
            incoming=self.crossing(last),
            outgoing=self.crossing(first),
        )

    @property
    def is_local(self) -> bool:
        """A block-local rule (``LOCAL_RULES``): its losses are the rule's, not the head's."""
        return self.rule in LOCAL_RULES

    @property
    def top_down(self) -> bool:
        """A top-down rule (``TOP_DOWN_RULES``): a message from the last stage to the first
        and a second forward pass per microbatch instead of streams."""
        return self.rule in TOP_DOWN_RULES

    def reads_shared_head_below_top(self, head_mode: str) -> bool:
        """A shared head is evaluated (read-only) at loss points below T when h < T."""
        return (
            head_mode == "shared" and self.horizon < self.num_blocks and self.rule in HORIZON_RULES
        )

    @property
    def input_gradient_products(self) -> int:
        """Vector-Jacobian products w.r.t. block inputs per microbatch (block 0 needs none)."""
        return sum(s.loss_point - max(s.low + 1, 1) for s in self.streams)

    def __str__(self) -> str:
        points = self.loss_points
        title = f"{self.rule} h={self.horizon} T={self.num_blocks}"
        if self.top_down:
            return (
                f"{title}: no backward streams; the error at x({self.num_blocks}) goes to the "
                f"input, and a second forward pass trains every block"
            )
        lines = [f"{title}  (W = weight gradient taken here, · = passes through)"]
        lines.append("block " + "".join(f"{'l' + str(s):>4}" for s in points))
        for block in range(self.num_blocks):
            cells = []
            for stream in self.streams:
                mark = "W" if stream.trains(block) else "·" if stream.passes(block) else ""
                cells.append(f"{mark:>4}")
            lines.append(f"{block:>5} " + "".join(cells).rstrip())
        return "\n".join(lines)
