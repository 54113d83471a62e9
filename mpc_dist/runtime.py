"""The pipeline runtime: one process per stage and replica executes its schedule's action list.

Handlers per action kind run the horizon engine on the stage's blocks and move activations and
cotangents with non-blocking torch.distributed point-to-point operations. Message shapes follow
from the model (every rank builds it), so nothing about shapes is negotiated at run time.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .engine import HorizonEngine
from .models import BlockModel
from .plan import Plan
from .schedule import Action, Schedule, generate, peer, send_order, validate
from .topology import Topology

BUCKET_BYTES = 25 * 2**20


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


@dataclass
class Groups:
    """Process groups this rank belongs to (None when the group would hold one rank)."""

    pipeline: dist.ProcessGroup | None
    data_parallel: dist.ProcessGroup | None

    @staticmethod
    def create(topology: Topology) -> Groups:
        # new_group is collective over the world: every rank creates every group, in order.
        pipeline = data_parallel = None
        for d in range(topology.replicas):
            group = dist.new_group(topology.pipeline_ranks(d))
            if d == topology.replica:
                pipeline = group
        for k in range(topology.stages):
            group = dist.new_group(topology.data_parallel_ranks(k))
            if k == topology.stage:
                data_parallel = group
        return Groups(
            pipeline if topology.stages > 1 else None,
            data_parallel if topology.replicas > 1 else None,
        )


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


@dataclass
class StageTimes:
    busy: float = 0.0  # seconds in compute actions
    wall: float = 0.0  # seconds inside run()


class PipelineRuntime:
    """Executes schedules for one (stage, replica) rank."""

    def __init__(
        self,
        model: BlockModel,
        plan: Plan,
        ranges: list[tuple[int, int]],
        topology: Topology,
        groups: Groups,
        optimizer: torch.optim.Optimizer,
        state_shapes: list[tuple[int, ...]],
        num_microbatches: int,
        mode: str,
        policy: str,
        device: torch.device,
        dtype: torch.dtype,
        grad_clip: float = 0.0,
    ) -> None:
        self.model, self.plan, self.ranges = model, plan, ranges
        self.topology, self.groups, self.optimizer = topology, groups, optimizer
        self.state_shapes, self.num_microbatches = state_shapes, num_microbatches
        self.mode, self.policy, self.device, self.dtype = mode, policy, device, dtype
        self.grad_clip = grad_clip
        self.stage = topology.stage
        self.first, self.last = ranges[self.stage]
        self.is_last = self.stage == topology.stages - 1
        self.engine = HorizonEngine(model, plan, track_memory=True)
        self.params = [p for p in owned_parameters(model) if p.requires_grad]
        self.times = StageTimes()
        self._schedules: dict[int, Schedule] = {}
        self.microbatch_size = 0
        self.steps = 0
        self.trace: list[tuple[Action, float, float]] | None = None  # set to [] to record

    def schedule(self, num_minibatches: int) -> Schedule:
        if num_minibatches not in self._schedules:
            schedule = generate(
                self.plan, self.ranges, self.num_microbatches, num_minibatches,
                self.mode, self.policy,
            )  # fmt: skip
            validate(schedule)
            self._schedules[num_minibatches] = schedule
        return self._schedules[num_minibatches]

    def _shape_of(self, message: tuple) -> tuple[int, ...]:
        kind = message[0]
        boundary = self.first if kind == "F" else self.last
        return (self.microbatch_size, *self.state_shapes[boundary])

    # ------------------------------------------------------------------ one chunk

    def run(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        learning_rates: list[float],
    ) -> list[tuple[float, int]]:
        """Train on ``batches`` (this replica's share of each minibatch), one step each.

        Returns (final loss, correct predictions) per minibatch on the last stage, [] elsewhere.
        """
        m = self.num_microbatches
        if any(x.shape[0] % m for x, _ in batches):
            raise ValueError(f"a minibatch of {batches[0][0].shape[0]} does not split into {m}")
        schedule = self.schedule(len(batches))
        self.microbatch_size = batches[0][0].shape[0] // m
        mailbox = Mailbox(schedule, self.topology, self._shape_of, self.dtype, self.device)
        micro = [
            (x.to(self.device, self.dtype).chunk(m), y.to(self.device).chunk(m)) for x, y in batches
        ]
        results = [[0.0, 0] for _ in batches]
        inbox: dict[tuple, torch.Tensor] = {}
        outbox: dict[tuple, torch.Tensor] = {}
        born = {s.loss_point for s in schedule.stages[self.stage].born}
        scale = 1.0 / (m * self.topology.replicas)
        started = time.perf_counter()
        for action in schedule.actions[self.stage]:
            n, i, s, kind = action.minibatch, action.microbatch, action.stream, action.kind
            tick = time.perf_counter()
            if kind in ("RF", "RB"):
                inbox[action.message] = mailbox.receive(action.message, peer(action))
            elif kind in ("SF", "SB"):
                mailbox.send(outbox.pop(action.message), peer(action))
            elif kind == "F":
                x = micro[n][0][i] if self.stage == 0 else inbox.pop(action.message)
                y = micro[n][1][i]
                result = self.engine.forward(n * m + i, x, y, scale, eager=False)
                if result.output is not None:
                    outbox[action.message] = result.output
                if result.logits is not None:
                    results[n][0] += result.losses[self.plan.num_blocks].item()
                    results[n][1] += int((result.logits.argmax(-1) == y).sum())
            elif kind == "B":
                cotangent = None if s in born else inbox.pop(("B", n, i, s))
                below = self.engine.backward(n * m + i, s, cotangent)
                if below is not None:
                    outbox[("B", n, i, s)] = below
            elif kind == "S":
                self._step(results[n][0], learning_rates[n])
            if kind in ("F", "B", "S"):
                now = time.perf_counter()
                self.times.busy += now - tick
                if self.trace is not None:
                    self.trace.append((action, tick, now))
        mailbox.flush()
        self.times.wall += time.perf_counter() - started
        return (
            [(loss * self.topology.replicas, correct) for loss, correct in results]
            if self.is_last
            else []
        )

    # ------------------------------------------------------------------ optimizer step

    def _step(self, loss: float, lr: float) -> None:
        """All-reduce over replicas, clip, check the loss, step; sync mode flushes the pipeline."""
        self.steps += 1
        _maybe_inject_fault(self.topology.rank, self.steps)
        if self.groups.data_parallel is not None:
            _all_reduce_buckets([p.grad for p in self.params if p.grad is not None],
                                self.groups.data_parallel)  # fmt: skip
        grads = [p.grad for p in self.params if p.grad is not None]
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        for grad in grads:
            local[0] += grad.double().pow(2).sum()
        local[1] = 0.0 if math.isfinite(loss) else 1.0
        if self.mode == "sync" and self.groups.pipeline is not None:
            dist.all_reduce(local, group=self.groups.pipeline)  # the flush: global norm and NaN
        norm_sq, nonfinite = local.tolist()
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError("non-finite loss")
        if self.grad_clip > 0:
            factor = min(1.0, self.grad_clip / (math.sqrt(norm_sq) + 1e-6))
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(factor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._broadcast_shared_head()

    def _broadcast_shared_head(self) -> None:
        """The shared head's copies on earlier stages follow the last stage's (sync mode)."""
        if not needs_head_copies(self.model.head_mode, self.plan) or self.groups.pipeline is None:
            return
        src = self.topology.rank_of(self.topology.stages - 1)
        flat = _flatten_dense_tensors([p.data for p in self.model.head.parameters()])
        dist.broadcast(flat, src=src, group=self.groups.pipeline)
        for p, value in zip(
            self.model.head.parameters(),
            _unflatten_dense_tensors(flat, list(self.model.head.parameters())),
            strict=True,
        ):
            p.data.copy_(value)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """Forward-only pass of replica 0 through the stages; (loss sum, correct) on the last."""
        if self.topology.replica != 0:
            return 0.0, 0
        was_training = self.model.training
        self.model.eval()
        loss, correct = 0.0, 0
        for x, y in batches:
            if self.stage == 0:
                state = x.to(self.device, self.dtype)
            else:
                state = torch.empty((x.shape[0], *self.state_shapes[self.first]),
                                    dtype=self.dtype, device=self.device)  # fmt: skip
                dist.recv(state, src=self.topology.rank_of(self.stage - 1))
            out = self.engine.infer(state)
            if self.is_last:
                y = y.to(self.device)
                loss += torch.nn.functional.cross_entropy(out.float(), y, reduction="sum").item()
                correct += int((out.argmax(-1) == y).sum())
            else:
                dist.send(out.contiguous(), dst=self.topology.rank_of(self.stage + 1))
        self.model.train(was_training)
        return loss, correct


def _maybe_inject_fault(rank: int, step: int) -> None:
    """Failure drills: MPC_DIST_INJECT_FAULT=RANK:STEP:raise|kill fails that rank at that step."""
    spec = os.environ.get("MPC_DIST_INJECT_FAULT")
    if not spec:
        return
    fault_rank, fault_step, kind = spec.split(":")
    if rank == int(fault_rank) and step == int(fault_step):
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at step {step}")


def needs_head_copies(head_mode: str, plan: Plan) -> bool:
    """A shared head is evaluated below T (read-only) on every stage when h < T."""
    return head_mode == "shared" and plan.horizon < plan.num_blocks


def owned_parameters(model: BlockModel) -> list[torch.nn.Parameter]:
    """Parameters this part trains: a shared head's copy below the last block is read-only."""
    holds_last = model.num_blocks - 1 in model.block_indices
    return [p for name, p in model.named_parameters() if holds_last or not name.startswith("head.")]


def _all_reduce_buckets(grads: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in [*grads, None]:
        if grad is not None:
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
        if bucket and (grad is None or size >= BUCKET_BYTES):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                g.copy_(reduced)
            bucket, size = [], 0
