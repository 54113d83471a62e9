"""Point-to-point messages of a schedule: posted in the order the peer sends them."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from .schedule import Schedule, send_order
from .topology import Topology


class Mailbox:
    """Point-to-point messages of one schedule for one rank.

    Receives from a peer are posted in the order that peer sends (its action list says which),
    each with the message's sequence number as tag, so they match under gloo (tags) and NCCL
    (per-pair order) alike. Up to ``window`` receives are posted ahead of need.
    """

    def __init__(
        self,
        schedule: Schedule,
        topology: Topology,
        shape_of: Callable[[tuple], tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
        window: int = 4,
        max_pending_sends: int = 64,
    ) -> None:
        self.topology, self.shape_of, self.dtype, self.device = topology, shape_of, dtype, device
        stage = topology.stage
        neighbours = [k for k in (stage - 1, stage + 1) if 0 <= k < schedule.num_stages]
        self._expected = {k: deque(send_order(schedule, k, stage)) for k in neighbours}
        self._recv_seq = dict.fromkeys(neighbours, 0)
        self._send_seq = dict.fromkeys(neighbours, 0)
        self._posted: dict[tuple, tuple[dist.Work, torch.Tensor]] = {}
        self._sends: deque[tuple[dist.Work, torch.Tensor]] = deque()
        self.window, self.max_pending_sends = window, max_pending_sends

    def _post_next(self, stage: int) -> None:
        message = self._expected[stage].popleft()
        buffer = torch.empty(self.shape_of(message), dtype=self.dtype, device=self.device)
        src = self.topology.rank_of(stage)
        work = dist.irecv(buffer, src=src, tag=self._recv_seq[stage])
        self._recv_seq[stage] += 1
        self._posted[message] = (work, buffer)

    def receive(self, message: tuple, stage: int) -> torch.Tensor:
        while message not in self._posted:
            self._post_next(stage)
        ahead = sum(1 for m in self._posted if m != message)
        while self._expected[stage] and ahead < self.window:
            self._post_next(stage)
            ahead += 1
        work, buffer = self._posted.pop(message)
        work.wait()
        return buffer

    def send(self, tensor: torch.Tensor, stage: int) -> None:
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, dst=self.topology.rank_of(stage), tag=self._send_seq[stage])
        self._send_seq[stage] += 1
        self._sends.append((work, tensor))  # keep the buffer alive until the send completes
        while len(self._sends) > self.max_pending_sends:
            self._sends.popleft()[0].wait()

    def flush(self) -> None:
        while self._sends:
            self._sends.popleft()[0].wait()
        if self._posted or any(self._expected.values()):
            raise RuntimeError("schedule ended with messages still expected")
