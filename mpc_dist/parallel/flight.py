"""The flight record: what a rank did last and what it waits for, kept while it trains and
written when the job fails, so that a hang or a crash can be explained afterwards.

The main thread appends every action it starts to a bounded ring (a ``deque``: no I/O, no lock)
and marks the message it blocks on; the watchdog thread reads both (copies, taken under the GIL)
to publish this rank's state in one line through the rendezvous store, to notice a message
waited for longer than ``pipeline.timeout``, and to write ``failure/rank_<r>.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple

from .actions import Action, ActionKind, Message, MessageKind
from .topology import Topology

CAPACITY = 32  # actions kept per rank

_CARRIES = {
    MessageKind.ACTIVATION: "the activation",
    MessageKind.SECOND_PASS: "the second-pass activation",
    MessageKind.TOP_DOWN: "the top-down error",
}
_DOES = {
    ActionKind.F: "the forward",
    ActionKind.G: "the second forward pass",
}


class Wait(NamedTuple):
    """A message the main thread blocks on (a tuple: made on every receive, it must be cheap)."""

    message: Message
    peer: int  # the stage at the other end
    sending: bool  # True: waiting until the peer has taken a message this rank sent
    since: float  # time.time() when the wait began


class FlightRecord:
    """One rank's recent actions, the message it waits for, and where the loop is."""

    def __init__(self, topology: Topology, capacity: int = CAPACITY) -> None:
        self.topology = topology
        self.recent: deque[tuple[Action, float]] = deque(maxlen=capacity)
        self.in_schedule = False  # recent[-1] is the action being executed
        self.waiting: Wait | None = None
        self.phase = "starting"  # what the training loop does (set through the runner)
        self.step = 0  # optimizer steps completed when the current phase began
        self.error: str | None = None  # the traceback, when this rank raised

    # ------------------------------------------------------------ the main thread (hot path)

    def begin(self, action: Action) -> None:
        self.recent.append((action, time.time()))

    def note(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step

    # ------------------------------------------------------------ the watchdog thread

    def waited(self, now: float | None = None) -> float:
        """Seconds the main thread has been blocked on one message (0: not blocked)."""
        wait = self.waiting
        return 0.0 if wait is None else (now or time.time()) - wait.since

    def where(self) -> str:
        """Stage (and replica, with several) of this rank, as the one-line states name it."""
        t = self.topology
        return f"stage {t.stage}" + (f" of replica {t.replica}" if t.replicas > 1 else "")

    def describe(self, now: float | None = None) -> str:
        """This rank's state in one line, e.g. ``stage 2 waits 12 s for the cotangent of stream
        5 of microbatch 3 of step 7 from stage 3``."""
        now, wait, recent = now or time.time(), self.waiting, self.recent.copy()
        if wait is not None:
            what, seconds = self._message(wait.message), now - wait.since
            if wait.sending:
                return f"{self.where()} waits {seconds:.0f} s for stage {wait.peer} to take {what}"
            return f"{self.where()} waits {seconds:.0f} s for {what} from stage {wait.peer}"
        if self.in_schedule and recent:
            action, started = recent[-1]
            return f"{self.where()} runs {self._action(action)} ({now - started:.0f} s)"
        last = f" (last action {recent[-1][0]})" if recent else ""
        return f"{self.where()}: {self.phase}{last}"

    def _step_of(self, minibatch: int) -> int:
        return self.step + minibatch + 1

    def _message(self, message: Message) -> str:
        where = f"microbatch {message.microbatch} of step {self._step_of(message.minibatch)}"
        if message.kind == MessageKind.COTANGENT:
            return f"the cotangent of stream {message.stream} of {where}"
        return f"{_CARRIES[message.kind]} of {where}"

    def _action(self, action: Action) -> str:
        step = self._step_of(action.minibatch)
        where = f"microbatch {action.microbatch} of step {step}"
        kind = action.kind
        if kind == ActionKind.S:
            return f"the optimizer step of step {step}"
        if kind in (ActionKind.B, ActionKind.W):
            part = "backward" if kind == ActionKind.B else "weight gradients"
            return f"the {part} of stream {action.stream} of {where}"
        if kind.is_send:
            return f"the send of {self._message(action.message)} to stage {action.peer}"
        if kind.is_receive:
            return f"the receive of {self._message(action.message)} from stage {action.peer}"
        return f"{_DOES.get(kind, f'the {kind} action')} of {where}"

    def snapshot(self, reason: str, failure: str | None) -> dict[str, Any]:
        """The record as JSON-ready data."""
        now, wait, t = time.time(), self.waiting, self.topology
        waiting = None
        if wait is not None:
            waiting = {
                "message": str(wait.message),
                "what": self._message(wait.message),
                "peer_stage": wait.peer,
                "sending": wait.sending,
                "since": wait.since,
                "seconds": round(now - wait.since, 3),
            }
        recent = [
            {"action": str(a), "step": self._step_of(a.minibatch), "started": started}
            for a, started in self.recent.copy()
        ]
        return {
            "rank": t.rank,
            "stage": t.stage,
            "replica": t.replica,
            "time": now,
            "pid": os.getpid(),
            "reason": reason,
            "failure": failure,
            "state": self.describe(now),
            "phase": self.phase,
            "step": self.step,
            "in_schedule": self.in_schedule,
            "waiting": waiting,
            "recent": recent,
            "error": self.error,
        }

    def write(self, directory: Path, reason: str, failure: str | None) -> Path:
        """``directory/rank_<r>.json``, written atomically (a reader never sees half of it)."""
        return write_json(
            directory / f"rank_{self.topology.rank}.json", self.snapshot(reason, failure)
        )


def write_json(path: Path, data: Any) -> Path:
    """Write ``path`` through a temporary file and a rename: whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)
    return path
