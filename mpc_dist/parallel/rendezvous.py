"""Messages as the runtime posts them, under NCCL's semantics: a send completes only together
with its matching receive, and each communicator runs a rank's operations in posting order.
``check_rendezvous`` proves a schedule completes that way with the mailbox's posting rules."""

from __future__ import annotations

from collections import defaultdict, deque

from .actions import ActionKind, Message, ScheduleError
from .schedule import Schedule

RECEIVE_AHEAD = 4  # receives a rank posts ahead of need, per peer
MAX_PENDING_SENDS = 64  # sends in flight before a rank waits for the oldest


def comm_of(stage: int, peer_stage: int, message: Message, split: bool = True) -> tuple:
    """The communicator a message travels on: one per pair of stages and direction (``split``),
    or one per pair for both directions (what plain isend/irecv share under NCCL)."""
    pair = (min(stage, peer_stage), max(stage, peer_stage))
    return (*pair, message.kind.channel) if split else pair


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
    _Rendezvous(schedule, split, window, max_pending_sends).run()


class _Rendezvous:
    def __init__(self, schedule: Schedule, split: bool, window: int, max_pending: int) -> None:
        self.schedule, self.split = schedule, split
        self.window, self.max_pending = window, max_pending
        P = self.num_stages = schedule.num_stages
        # per communicator, per rank: the operations posted, in order
        self.queues: dict[tuple, dict[int, deque]] = defaultdict(lambda: defaultdict(deque))
        self.expected = {
            (k, p): deque(schedule.send_order(p, k)) for k in range(P) for p in range(P) if p != k
        }
        self.unconsumed: dict[tuple, int] = defaultdict(int)  # (stage, peer): posted, not needed
        self.posted: set[tuple] = set()  # (stage, message) receives posted
        self.arrived: set[tuple] = set()  # (receiving stage, message)
        self.pending: list[deque] = [deque() for _ in range(P)]  # sends in flight per stage
        self.done_sends: set[tuple] = set()  # (sending stage, message)
        self.at_step: dict[int, set[int]] = defaultdict(set)
        self.position = [0] * P

    def run(self) -> None:
        while any([self.advance(k) for k in range(self.num_stages)]) | self.match():
            pass
        actions = self.schedule.actions
        stuck = {
            k: str(actions[k][self.position[k]])
            for k in range(self.num_stages)
            if self.position[k] < len(actions[k])
        }
        if stuck:
            heads = {c: {k: q[0] for k, q in ends.items() if q} for c, ends in self.queues.items()}
            heads = {c: h for c, h in heads.items() if h}
            raise ScheduleError(
                f"deadlock under rendezvous sends: stages stuck at {stuck}; "
                f"communicator queue heads {heads}"
            )

    def post_receive(self, k: int, peer_stage: int) -> None:
        message = self.expected[(k, peer_stage)].popleft()
        self.queues[comm_of(k, peer_stage, message, self.split)][k].append(("recv", message))
        self.posted.add((k, message))
        self.unconsumed[(k, peer_stage)] += 1

    def advance(self, k: int) -> bool:
        """Stage k goes as far as it can; whether it moved."""
        moved, actions = False, self.schedule.actions[k]
        while self.position[k] < len(actions):
            a, pending = actions[self.position[k]], self.pending[k]
            if pending and len(pending) > self.max_pending:
                if (k, pending[0]) not in self.done_sends:
                    return moved
                pending.popleft()
                continue
            if a.kind.is_send:
                self.queues[comm_of(k, a.peer, a.message, self.split)][k].append(
                    ("send", a.message)
                )
                pending.append(a.message)
            elif (
                a.kind.is_receive
                and not self.receive(k, a.peer, a.message)
                or a.kind == ActionKind.S
                and not self.step(k, a.minibatch)
            ):
                return moved
            self.position[k] += 1
            moved = True
        return moved

    def receive(self, k: int, source: int, message: Message) -> bool:
        """Post receives up to ``message`` and the window ahead; whether it has arrived."""
        while (k, message) not in self.posted:
            self.post_receive(k, source)
        while self.expected[(k, source)] and self.unconsumed[(k, source)] <= self.window:
            self.post_receive(k, source)
        if (k, message) not in self.arrived:
            return False
        self.unconsumed[(k, source)] -= 1
        return True

    def step(self, k: int, minibatch: int) -> bool:
        """A sync step waits for every stage."""
        if self.schedule.mode != "sync" or self.num_stages == 1:
            return True
        self.at_step[minibatch].add(k)
        return len(self.at_step[minibatch]) == self.num_stages

    def match(self) -> bool:
        """Complete the sends and receives at the heads of every communicator's queues."""
        moved = False
        for comm, ends in self.queues.items():
            a, b = comm[0], comm[1]
            while ends[a] and ends[b]:
                (kind_a, msg_a), (kind_b, msg_b) = ends[a][0], ends[b][0]
                if msg_a != msg_b or kind_a == kind_b:
                    break
                ends[a].popleft(), ends[b].popleft()
                sender, receiver = (a, b) if kind_a == "send" else (b, a)
                self.done_sends.add((sender, msg_a))
                self.arrived.add((receiver, msg_a))
                moved = True
        return moved
