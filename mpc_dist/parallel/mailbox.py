"""Point-to-point messages of a schedule: posted in the order the peer sends them."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from .groups import Groups
from .schedule import CHANNEL, MAX_PENDING_SENDS, RECEIVE_AHEAD, Schedule, send_order


class Mailbox:
    """Point-to-point messages of one schedule for one rank.

    Receives from a peer are posted in the order that peer sends (its action list says which),
    each with the message's sequence number as tag, so they match under gloo (tags) and NCCL
    (per-communicator order) alike. Activations and cotangents travel on their own groups
    (``Groups.messages``). Per peer, up to ``window`` receives are posted ahead of need; after
    ``max_pending_sends`` sends in flight the oldest is waited for. ``check_rendezvous`` in
    ``schedule.py`` simulates exactly this posting.
    """

    def __init__(
        self,
        schedule: Schedule,
        groups: Groups,
        shape_of: Callable[[tuple], tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
        window: int = RECEIVE_AHEAD,
        max_pending_sends: int = MAX_PENDING_SENDS,
    ) -> None:
        self.groups, self.topology = groups, groups.topology
        self.shape_of, self.dtype, self.device = shape_of, dtype, device
        stage = self.topology.stage
        peers = [k for k in range(schedule.num_stages) if k != stage]  # neighbours; top-down
        self._expected = {k: deque(send_order(schedule, k, stage)) for k in peers}
        self._recv_seq = dict.fromkeys(peers, 0)
        self._send_seq = dict.fromkeys(peers, 0)
        self._unconsumed = dict.fromkeys(peers, 0)
        self._posted: dict[tuple, tuple[dist.Work, torch.Tensor]] = {}
        self._sends: deque[tuple[dist.Work, torch.Tensor]] = deque()
        self.window, self.max_pending_sends = window, max_pending_sends

    def _post_next(self, stage: int) -> None:
        message = self._expected[stage].popleft()
        buffer = torch.empty(self.shape_of(message), dtype=self.dtype, device=self.device)
        src, group = self.topology.rank_of(stage), self.groups.messages.get(CHANNEL[message[0]])
        work = dist.irecv(buffer, src=src, group=group, tag=self._recv_seq[stage])
        self._recv_seq[stage] += 1
        self._unconsumed[stage] += 1
        self._posted[message] = (work, buffer)

    def receive(self, message: tuple, stage: int) -> torch.Tensor:
        while message not in self._posted:
            self._post_next(stage)
        while self._expected[stage] and self._unconsumed[stage] <= self.window:
            self._post_next(stage)
        self._unconsumed[stage] -= 1
        work, buffer = self._posted.pop(message)
        work.wait()
        return buffer

    def send(self, tensor: torch.Tensor, stage: int, kind: str) -> None:
        tensor = tensor.detach().contiguous()
        dst, group = self.topology.rank_of(stage), self.groups.messages.get(CHANNEL[kind])
        work = dist.isend(tensor, dst=dst, group=group, tag=self._send_seq[stage])
        self._send_seq[stage] += 1
        self._sends.append((work, tensor))  # keep the buffer alive until the send completes
        while len(self._sends) > self.max_pending_sends:
            self._sends.popleft()[0].wait()

    def flush(self) -> None:
        while self._sends:
            self._sends.popleft()[0].wait()
        if self._posted or any(self._expected.values()):
            raise RuntimeError("schedule ended with messages still expected")
