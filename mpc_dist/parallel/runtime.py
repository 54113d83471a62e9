"""The pipeline runtime: one process per stage and replica executes its schedule's action list.

A table maps each action kind to its handler: compute handlers run the engine the runtime was
handed (any rule's: the engine contract of ``mpc_dist.core``) on the stage's blocks and the step
function; message handlers move activations and cotangents with non-blocking point-to-point
operations. Message shapes follow from the model, so nothing about shapes is negotiated at run
time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from ..core import Engine, LossScaler
from .actions import Action, ActionKind, Message, MessageKind
from .flight import FlightRecord
from .generate import generate, validate_schedule
from .groups import Groups, broadcast_parameters
from .mailbox import Mailbox
from .schedule import Schedule, ScheduleSpec


class StepFunction(Protocol):
    """The one optimizer step (``mpc_dist.train.step``): called with the minibatch's loss on
    this stage (0 where no loss is evaluated) and its learning rate; it may raise to stop."""

    scale_loss: LossScaler | None  # applied before backward (fp16)

    def __call__(self, loss: torch.Tensor, lr: float) -> None: ...


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    schedule: ScheduleSpec = ScheduleSpec()  # microbatches, mode, policy, weight deferral
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # of the parameters and the inputs
    trace: bool = False  # keep (action, start, end) of every compute action in runtime.trace
    soft_targets: bool = False  # targets are class probabilities (mixup, label smoothing)


@dataclass
class StageTimes:
    busy: float = 0.0  # seconds in compute actions
    wall: float = 0.0  # seconds inside run()


class EventClock:
    """Start and end of compute actions, in seconds of the host clock. On GPUs kernels run
    asynchronously, so actions are timed with CUDA events (resolved once per chunk)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[Action, object, object]] = []
        self.base_host = time.perf_counter()
        self.base = self.now()

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def intervals(self) -> list[tuple[Action, float, float]]:
        if not self.cuda:
            return self.marks
        torch.cuda.synchronize()
        at = lambda e: self.base_host + self.base.elapsed_time(e) / 1000  # noqa: E731
        return [(action, at(start), at(end)) for action, start, end in self.marks]


@dataclass
class _Chunk:
    """The minibatches one ``run`` trains on and what their actions hand each other."""

    microbatches: list[tuple[tuple, tuple]]  # inputs and targets per microbatch, where used
    learning_rates: list[float]
    mailbox: Mailbox
    losses: list[torch.Tensor]  # final loss per minibatch (last stage)
    correct: list[torch.Tensor]  # correct predictions per minibatch (last stage)
    inbox: dict[tuple, torch.Tensor] = field(default_factory=dict)
    outbox: dict[tuple, torch.Tensor] = field(default_factory=dict)


class PipelineRuntime:
    """Executes schedules for one (stage, replica) rank."""

    def __init__(
        self,
        engine: Engine,
        ranges: list[tuple[int, int]],
        groups: Groups,
        step: StepFunction,
        options: RuntimeOptions,
    ) -> None:
        """``engine`` runs this rank's blocks (``ranges[stage]``) for the plan's rule."""
        self.engine, self.model, self.plan = engine, engine.model, engine.plan
        self.ranges, self.groups, self.step, self.options = ranges, groups, step, options
        self.topology = groups.topology
        self.stage = self.topology.stage
        self.first, self.last = ranges[self.stage]
        self.is_last = self.topology.is_last_stage
        self.message_dtype = engine.compute.autocast_dtype or options.dtype  # the compute dtype
        plan = self.plan
        self.head_copies = plan.reads_shared_head_below_top(self.model.head_mode)
        # Only the first stage reads data; the targets travel up with the activations as far
        # as the last stage that evaluates a loss.
        needs = [bool(plan.part(*r).born) for r in ranges]
        needs[-1] |= plan.top_down
        self.sends_targets = any(needs[self.stage + 1 :])
        self.receives_targets = self.stage > 0 and any(needs[self.stage :])
        self.times = StageTimes()
        self.trace: list[tuple[Action, float, float]] = []
        self.flight = FlightRecord(self.topology)  # the last actions, for the watchdog
        self._schedules: dict[int, Schedule] = {}
        self._microbatch_size = 0
        self.handlers: dict[ActionKind, Callable[[Action, _Chunk], None]] = {
            ActionKind.F: self._forward,
            ActionKind.B: self._backward,
            ActionKind.W: self._weights,
            ActionKind.G: self._second_pass,
            ActionKind.S: self._step,
            **{kind: self._receive for kind in ActionKind if kind.is_receive},
            **{kind: self._send for kind in ActionKind if kind.is_send},
        }

    def schedule(self, num_minibatches: int) -> Schedule:
        if num_minibatches not in self._schedules:
            schedule = generate(self.plan, self.ranges, self.options.schedule, num_minibatches)
            validate_schedule(schedule)
            self._schedules[num_minibatches] = schedule
        return self._schedules[num_minibatches]

    # ------------------------------------------------------------------ one chunk

    def run(
        self,
        batches: list[tuple[torch.Tensor | None, torch.Tensor | None]],
        learning_rates: list[float],
        batch_size: int | None = None,
    ) -> list[tuple[float, int]]:
        """Train on ``batches`` (this replica's share of each minibatch: ``batch_size`` samples,
        by default the first batch's), one step each.

        Inputs and targets are read on the first stage only (elsewhere they may be None); the
        targets travel with the activations. Returns (final loss, correct predictions) per
        minibatch on the last stage, [] elsewhere.
        """
        m, device = self.options.schedule.num_microbatches, self.options.device
        batch_size = batch_size or len(batches[0][1])
        if batch_size % m:
            raise ValueError(f"a minibatch of {batch_size} does not split into {m}")
        schedule = self.schedule(len(batches))
        self._microbatch_size = batch_size // m
        zeros = [torch.zeros((), dtype=torch.float64, device=device) for _ in batches]
        chunk = _Chunk(
            [(self._split(x, self.options.dtype), self._split(y)) for x, y in batches],
            learning_rates,
            Mailbox(schedule, self.groups, self._payload, device, flight=self.flight),
            losses=zeros,
            correct=[z.clone() for z in zeros],
        )
        started, clock, flight = time.perf_counter(), EventClock(device), self.flight
        flight.in_schedule = True
        for action in schedule.actions[self.stage]:
            tick = clock.now()
            flight.begin(action)
            self.handlers[action.kind](action, chunk)
            if action.kind.is_compute:
                clock.marks.append((action, tick, clock.now()))
        chunk.mailbox.flush()
        flight.in_schedule = False
        intervals = clock.intervals()
        self.times.busy += sum(end - start for _, start, end in intervals)
        if self.options.trace:
            self.trace += intervals
        self.times.wall += time.perf_counter() - started
        if not self.is_last:
            return []
        replicas = self.topology.replicas
        return [
            (loss * replicas, int(correct))
            for loss, correct in zip(torch.stack(chunk.losses).tolist(), chunk.correct, strict=True)
        ]

    def _split(self, tensor: torch.Tensor | None, dtype: torch.dtype | None = None) -> tuple:
        """Microbatches of ``tensor`` on the device (in ``dtype``) on the first stage, which
        reads the data; Nones elsewhere."""
        m = self.options.schedule.num_microbatches
        if tensor is None or self.stage != 0:
            return (None,) * m
        if dtype is None and tensor.is_floating_point():  # soft targets: the parameters' dtype
            dtype = self.options.dtype
        return tensor.to(self.options.device, dtype).chunk(m)

    def _payload(self, message: Message) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the tensors a message carries: the model says, not the wire."""
        size, dtype = self._microbatch_size, self.message_dtype
        if message.kind == MessageKind.TOP_DOWN:  # one vector per sample
            return [((size, self.model.num_classes), dtype)]
        boundary = self.last if message.kind == MessageKind.COTANGENT else self.first
        samples = size * self.engine.samples_per_input
        payload = [((samples, *self.model.state_shapes[boundary]), dtype)]
        if message.kind == MessageKind.ACTIVATION and self.receives_targets:
            payload.append(self._targets_payload(size))
        return payload

    def _targets_payload(self, size: int) -> tuple[tuple[int, ...], torch.dtype]:
        if self.options.soft_targets:
            return (size, self.model.num_classes), self.options.dtype
        return (size,), torch.int64

    # ------------------------------------------------------------------ handlers

    def _forward(self, action: Action, chunk: _Chunk) -> None:
        n, i, m = action.minibatch, action.microbatch, self.options.schedule.num_microbatches
        if self.stage == 0:
            inputs, targets = chunk.microbatches[n]
            x, y = inputs[i], targets[i]
        else:
            x, *rest = chunk.inbox.pop(action.message)
            y = rest[0] if rest else None
        scale = 1.0 / (m * self.topology.replicas)
        result = self.engine.forward(n * m + i, x, y, scale, eager=False)
        if result.output is not None:
            chunk.outbox[action.message] = (
                [result.output, y] if self.sends_targets else [result.output]
            )
        if result.top_down is not None:  # to the first stage (this one, on a single stage)
            box = chunk.outbox if self.topology.stages > 1 else chunk.inbox
            box[self._top_down(n, i)] = [result.top_down]
        if result.logits is not None:
            chunk.losses[n] += result.losses[self.plan.num_blocks].double()
            labels = y.argmax(-1) if y.is_floating_point() else y
            chunk.correct[n] += (result.logits.argmax(-1) == labels).sum()

    def _backward(self, action: Action, chunk: _Chunk) -> None:
        n, i, s = action.minibatch, action.microbatch, action.stream
        cotangent = chunk.inbox.pop(action.message, [None])[0]  # None: the stream is born here
        microbatch = n * self.options.schedule.num_microbatches + i
        below = self.engine.backward(microbatch, s, cotangent, self.options.schedule.defer_weights)
        if below is not None:
            chunk.outbox[action.message] = [below]

    def _second_pass(self, action: Action, chunk: _Chunk) -> None:
        n, i, m = action.minibatch, action.microbatch, self.options.schedule.num_microbatches
        key = self._top_down(n, i) if self.stage == 0 else action.message
        output = self.engine.second_pass(n * m + i, chunk.inbox.pop(key)[0])
        if output is not None:
            chunk.outbox[action.message] = [output]

    def _weights(self, action: Action, chunk: _Chunk) -> None:
        m = self.options.schedule.num_microbatches
        self.engine.weight_backward(action.minibatch * m + action.microbatch, action.stream)

    def _step(self, action: Action, chunk: _Chunk) -> None:
        n = action.minibatch
        self.step(chunk.losses[n], chunk.learning_rates[n])
        if self.head_copies and self.groups.pipeline is not None:
            # the shared head's read-only copies follow the last stage's (sync mode)
            src = self.topology.rank_of(self.topology.stages - 1)
            broadcast_parameters(list(self.model.head.parameters()), src, self.groups.pipeline)

    def _receive(self, action: Action, chunk: _Chunk) -> None:
        chunk.inbox[action.message] = chunk.mailbox.receive(action.message, action.peer)

    def _send(self, action: Action, chunk: _Chunk) -> None:
        chunk.mailbox.send(chunk.outbox.pop(action.message), action.peer, action.message)

    def _top_down(self, minibatch: int, microbatch: int) -> Message:
        """The top-down message of a microbatch (from the last stage)."""
        return Message(MessageKind.TOP_DOWN, minibatch, microbatch, self.topology.stages - 1)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def infer(
        self, x: torch.Tensor | None, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Forward-only through this replica's stages: (logits, targets) on the last stage, else
        None. ``x`` and ``y`` (class indices) are read on the first stage only; the targets
        travel up, after the batch's size (an evaluation's last batch may be short)."""
        device, dtype = self.options.device, self.options.dtype
        if self.stage == 0:
            state, y = x.to(device, dtype), y.to(device)
        else:
            source = self.topology.rank_of(self.stage - 1)
            size = torch.empty((), dtype=torch.int64, device=device)
            dist.recv(size, src=source)
            shape = (int(size), *self.model.state_shapes[self.first])
            state = torch.empty(shape, dtype=self.message_dtype, device=device)
            y = torch.empty(shape[:1], dtype=torch.int64, device=device)
            dist.recv(state, src=source)
            dist.recv(y, src=source)
        out = self.engine.infer(state)
        if self.is_last:
            return out, y
        destination = self.topology.rank_of(self.stage + 1)
        dist.send(torch.tensor(len(y), device=device), dst=destination)
        dist.send(out.contiguous(), dst=destination)
        dist.send(y, dst=destination)
        return None
