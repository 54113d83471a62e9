"""Point-to-point messages of a schedule: posted in the order the peer sends them."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from .actions import Message
from .flight import FlightRecord, Wait
from .groups import Groups
from .rendezvous import MAX_PENDING_SENDS, RECEIVE_AHEAD
from .schedule import Schedule

Payload = Callable[[Message], list[tuple[tuple[int, ...], torch.dtype]]]


class Mailbox:
    """Point-to-point messages of one schedule for one rank.

    A message carries one or more tensors (an activation, and the targets travelling with it);
    ``payload(message)`` gives their shapes and dtypes, known from the model, not the wire.
    Receives from a peer are posted in the order that peer sends (its action list says which),
    each tensor with the next sequence number as tag, so they match under gloo (tags) and NCCL
    (per-communicator order) alike. Activations and cotangents travel on their own groups
    (``Groups.messages``). Per peer, up to ``window`` messages are posted ahead of need; after
    ``max_pending_sends`` messages in flight the oldest is waited for. ``check_rendezvous`` in
    ``rendezvous.py`` simulates exactly this posting. With a ``flight`` record, every wait for
    a message is marked there (which message, which peer, since when) for the watchdog.
    """

    def __init__(
        self,
        schedule: Schedule,
        groups: Groups,
        payload: Payload,
        device: torch.device,
        window: int = RECEIVE_AHEAD,
        max_pending_sends: int = MAX_PENDING_SENDS,
        flight: FlightRecord | None = None,
    ) -> None:
        self.groups, self.topology = groups, groups.topology
        self.payload, self.device = payload, device
        stage = self.topology.stage
        peers = [k for k in range(schedule.num_stages) if k != stage]  # neighbours; top-down
        self._expected = {k: deque(schedule.send_order(k, stage)) for k in peers}
        self._recv_seq = dict.fromkeys(peers, 0)
        self._send_seq = dict.fromkeys(peers, 0)
        self._unconsumed = dict.fromkeys(peers, 0)
        self._posted: dict[Message, list[tuple[dist.Work, torch.Tensor]]] = {}
        self._sends: deque[tuple[Message, int, list[tuple[dist.Work, torch.Tensor]]]] = deque()
        self.window, self.max_pending_sends = window, max_pending_sends
        self.flight = flight

    def _post_next(self, stage: int) -> None:
        message = self._expected[stage].popleft()
        src, group = self.topology.rank_of(stage), self.groups.messages.get(message.kind.channel)
        posted = []
        for shape, dtype in self.payload(message):
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            posted.append(
                (dist.irecv(buffer, src=src, group=group, tag=self._recv_seq[stage]), buffer)
            )
            self._recv_seq[stage] += 1
        self._unconsumed[stage] += 1
        self._posted[message] = posted

    def receive(self, message: Message, stage: int) -> list[torch.Tensor]:
        while message not in self._posted:
            self._post_next(stage)
        while self._expected[stage] and self._unconsumed[stage] <= self.window:
            self._post_next(stage)
        self._unconsumed[stage] -= 1
        buffers = []
        if self.flight is not None:
            self.flight.waiting = Wait(message, stage, False, time.time())
        for work, buffer in self._posted.pop(message):
            work.wait()
            buffers.append(buffer)
        if self.flight is not None:
            self.flight.waiting = None
        return buffers

    def send(self, tensors: list[torch.Tensor], stage: int, message: Message) -> None:
        dst, group = self.topology.rank_of(stage), self.groups.messages.get(message.kind.channel)
        sent = []
        for tensor in tensors:
            tensor = tensor.detach().contiguous()
            sent.append(
                (dist.isend(tensor, dst=dst, group=group, tag=self._send_seq[stage]), tensor)
            )
            self._send_seq[stage] += 1
        self._sends.append((message, stage, sent))  # buffers alive until the sends complete
        while len(self._sends) > self.max_pending_sends:
            self._wait(*self._sends.popleft())

    def flush(self) -> None:
        while self._sends:
            self._wait(*self._sends.popleft())
        if self._posted or any(self._expected.values()):
            raise RuntimeError("schedule ended with messages still expected")

    def _wait(self, message: Message, stage: int, sent: list[tuple[dist.Work, torch.Tensor]]):
        if self.flight is not None:
            self.flight.waiting = Wait(message, stage, True, time.time())
        for work, _ in sent:
            work.wait()
        if self.flight is not None:
            self.flight.waiting = None
