"""The pipeline runtime: one process per stage and replica executes its schedule's action list.

A table maps each action kind to its handler: compute handlers run the engine of the plan's rule
(``mpc_dist.rules``) on the stage's blocks and the step function; message handlers move
activations and cotangents with non-blocking point-to-point operations. Message shapes follow
from the model, so nothing about shapes is negotiated at run time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from ..config import RulesConfig
from ..core import ComputeOptions, Plan
from ..models import BlockModel
from ..rules import make_engine
from .generate import generate, validate
from .groups import Groups, broadcast_parameters
from .mailbox import Mailbox
from .schedule import COMPUTE, Action, Schedule, peer


class StepFunction(Protocol):
    """The one optimizer step (``mpc_dist.train.step``): called with the minibatch's loss on
    this stage (0 where no loss is evaluated) and its learning rate; it may raise to stop."""

    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None  # applied before backward (fp16)

    def __call__(self, loss: torch.Tensor, lr: float) -> None: ...


@dataclass(frozen=True)
class RuntimeOptions:
    num_microbatches: int = 1  # per minibatch, on this replica
    mode: str = "sync"  # sync (flush per minibatch) | async (spec section 4)
    policy: str = "horizon"  # horizon | 1f1b | gpipe
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # of the parameters and the inputs
    compute: ComputeOptions = ComputeOptions()  # mixed precision, activation checkpointing
    defer_weights: bool = False  # zero-bubble split: weight gradients as deferred W actions
    trace: bool = False  # keep (action, start, end) of every compute action in runtime.trace
    seed: int = 0  # of a rule's noise and negatives (forward gradient, forward-forward)
    rules: RulesConfig | None = None  # the options of the rules beyond the horizon

    @property
    def message_dtype(self) -> torch.dtype:
        """Activations and cotangents travel in the compute dtype."""
        return self.compute.state_dtype or self.dtype


@dataclass
class StageTimes:
    busy: float = 0.0  # seconds in compute actions
    wall: float = 0.0  # seconds inside run()


class _Clock:
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
        model: BlockModel,
        plan: Plan,
        ranges: list[tuple[int, int]],
        groups: Groups,
        step: StepFunction,
        options: RuntimeOptions,
    ) -> None:
        self.model, self.plan, self.ranges, self.groups = model, plan, ranges, groups
        self.step, self.options = step, options
        self.topology = groups.topology
        self.stage = self.topology.stage
        self.first, self.last = ranges[self.stage]
        self.is_last = self.topology.is_last_stage
        self.engine = make_engine(model, plan, True, options.compute, step.scale_loss, options.seed,
                                  options.rules)  # fmt: skip
        self.head_copies = plan.reads_shared_head_below_top(model.head_mode)
        self.evaluates_loss = bool(plan.part(self.first, self.last).born) or (
            plan.top_down and self.is_last
        )
        self.times = StageTimes()
        self.trace: list[tuple[Action, float, float]] = []
        self._schedules: dict[int, Schedule] = {}
        self._microbatch_size = 0
        self.handlers: dict[str, Callable[[Action, _Chunk], None]] = {
            "F": self._forward,
            "B": self._backward,
            "W": self._weights,
            "G": self._second_pass,
            "S": self._step,
            "RF": self._receive,
            "RB": self._receive,
            "RG": self._receive,
            "RT": self._receive,
            "SF": self._send,
            "SB": self._send,
            "SG": self._send,
            "ST": self._send,
        }

    def schedule(self, num_minibatches: int) -> Schedule:
        if num_minibatches not in self._schedules:
            o = self.options
            schedule = generate(
                self.plan, self.ranges, o.num_microbatches, num_minibatches, o.mode, o.policy,
                o.defer_weights,
            )  # fmt: skip
            validate(schedule)
            self._schedules[num_minibatches] = schedule
        return self._schedules[num_minibatches]

    # ------------------------------------------------------------------ one chunk

    def run(
        self, batches: list[tuple[torch.Tensor | None, torch.Tensor]], learning_rates: list[float]
    ) -> list[tuple[float, int]]:
        """Train on ``batches`` (this replica's share of each minibatch), one step each.

        Inputs are needed on the first stage only; targets are moved to the device only where
        a loss is evaluated. Returns (final loss, correct predictions) per minibatch on the last
        stage, [] elsewhere.
        """
        m, device = self.options.num_microbatches, self.options.device
        if any(y.shape[0] % m for _, y in batches):
            raise ValueError(f"a minibatch of {batches[0][1].shape[0]} does not split into {m}")
        schedule = self.schedule(len(batches))
        self._microbatch_size = batches[0][1].shape[0] // m
        zeros = [torch.zeros((), dtype=torch.float64, device=device) for _ in batches]
        chunk = _Chunk(
            [(self._split(x, self.options.dtype), self._split(y)) for x, y in batches],
            learning_rates,
            Mailbox(schedule, self.groups, self._shape_of, self.options.message_dtype, device),
            losses=zeros,
            correct=[z.clone() for z in zeros],
        )
        started, clock = time.perf_counter(), _Clock(device)
        for action in schedule.actions[self.stage]:
            tick = clock.now()
            self.handlers[action.kind](action, chunk)
            if action.kind in COMPUTE:
                clock.marks.append((action, tick, clock.now()))
        chunk.mailbox.flush()
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
        """Microbatches of ``tensor`` on the device where this stage uses it, else Nones: inputs
        (given a ``dtype``) on the first stage, targets where a loss is evaluated."""
        m = self.options.num_microbatches
        used = self.stage == 0 if dtype is not None else self.evaluates_loss
        if tensor is None or not used:
            return (None,) * m
        return tensor.to(self.options.device, dtype).chunk(m)

    def _shape_of(self, message: tuple) -> tuple[int, ...]:
        if message[0] == "T":  # the top-down message: one vector per sample
            return (self._microbatch_size, self.model.num_classes)
        boundary = self.last if message[0] == "B" else self.first
        samples = self._microbatch_size * self.engine.samples_per_input
        return (samples, *self.model.state_shapes[boundary])

    # ------------------------------------------------------------------ handlers

    def _forward(self, action: Action, chunk: _Chunk) -> None:
        n, i, m = action.minibatch, action.microbatch, self.options.num_microbatches
        inputs, targets = chunk.microbatches[n]
        x = inputs[i] if self.stage == 0 else chunk.inbox.pop(action.message)
        scale = 1.0 / (m * self.topology.replicas)
        result = self.engine.forward(n * m + i, x, targets[i], scale, eager=False)
        if result.output is not None:
            chunk.outbox[action.message] = result.output
        if result.top_down is not None:  # to the first stage (this one, on a single stage)
            box = chunk.outbox if self.topology.stages > 1 else chunk.inbox
            box[("T", n, i, self.topology.stages - 1)] = result.top_down
        if result.logits is not None:
            chunk.losses[n] += result.losses[self.plan.num_blocks].double()
            chunk.correct[n] += (result.logits.argmax(-1) == targets[i]).sum()

    def _backward(self, action: Action, chunk: _Chunk) -> None:
        n, i, s = action.minibatch, action.microbatch, action.stream
        cotangent = chunk.inbox.pop(action.message, None)  # None: the stream is born here
        microbatch = n * self.options.num_microbatches + i
        below = self.engine.backward(microbatch, s, cotangent, self.options.defer_weights)
        if below is not None:
            chunk.outbox[action.message] = below

    def _second_pass(self, action: Action, chunk: _Chunk) -> None:
        n, i, m = action.minibatch, action.microbatch, self.options.num_microbatches
        key = ("T", n, i, self.topology.stages - 1) if self.stage == 0 else action.message
        output = self.engine.second_pass(n * m + i, chunk.inbox.pop(key))
        if output is not None:
            chunk.outbox[action.message] = output

    def _weights(self, action: Action, chunk: _Chunk) -> None:
        m = self.options.num_microbatches
        self.engine.weight_backward(action.minibatch * m + action.microbatch, action.stream)

    def _step(self, action: Action, chunk: _Chunk) -> None:
        n = action.minibatch
        self.step(chunk.losses[n], chunk.learning_rates[n])
        if self.head_copies and self.groups.pipeline is not None:
            # the shared head's read-only copies follow the last stage's (sync mode)
            src = self.topology.rank_of(self.topology.stages - 1)
            broadcast_parameters(list(self.model.head.parameters()), src, self.groups.pipeline)

    def _receive(self, action: Action, chunk: _Chunk) -> None:
        chunk.inbox[action.message] = chunk.mailbox.receive(action.message, peer(action))

    def _send(self, action: Action, chunk: _Chunk) -> None:
        chunk.mailbox.send(chunk.outbox.pop(action.message), peer(action), action.message[0])

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def infer(self, x: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """Forward-only through this replica's stages: the logits on the last stage, else None.
        ``x`` is read on the first stage only."""
        device, dtype = self.options.device, self.options.dtype
        if self.stage == 0:
            state = x.to(device, dtype)
        else:
            shape = (batch_size, *self.model.state_shapes[self.first])
            state = torch.empty(shape, dtype=self.options.message_dtype, device=device)
            dist.recv(state, src=self.topology.rank_of(self.stage - 1))
        out = self.engine.infer(state)
        if self.is_last:
            return out
        dist.send(out.contiguous(), dst=self.topology.rank_of(self.stage + 1))
        return None
