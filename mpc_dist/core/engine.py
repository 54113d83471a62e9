"""The engine contract: what a pipeline stage (or the single-process trainer) runs on its run of
blocks, whatever the learning rule.

An engine forwards a microbatch through its blocks (``forward``), runs a stream's backward
(``backward``) and a deferred stream's weight gradients (``weight_backward``) where the rule has
streams, a top-down rule's second pass (``second_pass``), and inference (``infer``). The horizon
engine (``core.horizon_engine``) and the rules' engines (``mpc_dist.rules``) implement it; the
runtime is handed one and never asks which rule it runs. Every engine is built from a model part,
a plan and one ``EngineOptions``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..config import RulesConfig
from ..models import BlockModel
from .compile import compile_blocks
from .memory import ActivationMemory
from .plan import Plan

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossScaler = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ComputeOptions:
    autocast_dtype: torch.dtype | None = None  # mixed precision: compute in this dtype
    device_type: str = "cpu"  # autocast's device type
    checkpoint_blocks: bool = False  # recompute each block's forward in its backward
    compile: str | None = None  # a torch.compile backend for every block and head (None: eager)

    def autocast(self):
        """The context blocks compute in."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def state(self, out: torch.Tensor) -> torch.Tensor:
        """The detached state handed to the next block (or stage), in the compute dtype."""
        dtype = self.autocast_dtype
        return out.detach() if dtype is None else out.detach().to(dtype)


@dataclass(frozen=True)
class EngineOptions:
    compute: ComputeOptions = ComputeOptions()  # mixed precision, activation checkpointing
    track_memory: bool = True  # count saved activations (``engine.memory``)
    scale_loss: LossScaler | None = None  # multiplies each loss before its backward (fp16)
    seed: int = 0  # of a rule's random draws (forward-forward negatives, forward-gradient noise)
    criterion: Criterion = field(default=F.cross_entropy)  # the loss at every loss point
    rules: RulesConfig | None = None  # the options of the rules beyond the horizon (None: defaults)


@dataclass
class ForwardResult:
    """What a stage hands on after forwarding one microbatch."""

    output: torch.Tensor | None  # x(last), detached, when the run does not end the network
    logits: torch.Tensor | None  # the head's prediction, when it does
    losses: dict[int, torch.Tensor]  # loss point -> scaled loss value (detached)
    cotangents: dict[int, torch.Tensor]  # stream -> cotangent at x(first), for streams born here
    top_down: torch.Tensor | None = None  # a top-down rule's message to the first stage


class Engine:
    """What every engine shares: its run of blocks [first, last), options, memory accounting,
    compiling its blocks (``ComputeOptions.compile``: in place, the model's modules themselves),
    and training a whole model one microbatch at a time. Subclasses implement ``forward`` and
    ``infer`` and the actions their rule's schedules contain."""

    samples_per_input = 1  # states per input sample (a block-local rule may carry several)

    def __init__(self, model: BlockModel, plan: Plan, options: EngineOptions | None = None) -> None:
        if plan.num_blocks != model.num_blocks:
            raise ValueError(f"plan has {plan.num_blocks} blocks, model {model.num_blocks}")
        options = options or EngineOptions()
        self.model, self.plan, self.options = model, plan, options
        self.compute = options.compute
        blocks = model.block_indices
        self.first, self.last = blocks[0], blocks[-1] + 1
        if blocks != list(range(self.first, self.last)):
            raise ValueError(f"engine needs a contiguous run of blocks, got {blocks}")
        self.is_last = self.last == plan.num_blocks
        self.memory = ActivationMemory(model.parameters) if options.track_memory else None
        if self.compute.compile is not None:
            compile_blocks(model, self.compute.compile)

    def forward(
        self,
        microbatch: int,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_scale: float = 1.0,
        eager: bool = True,
    ) -> ForwardResult:
        """Forward one microbatch through the run, evaluating the loss points inside it. With
        ``eager`` the microbatch's other actions run at once where they can (a whole model
        trains in one call); otherwise the schedule calls them."""
        raise NotImplementedError

    def backward(
        self,
        microbatch: int,
        loss_point: int,
        cotangent: torch.Tensor | None = None,
        defer_weights: bool = False,
    ) -> torch.Tensor | None:
        """Run stream ``loss_point`` of ``microbatch`` through the run (a ``B`` action)."""
        raise NotImplementedError(f"rule {self.plan.rule} has no backward action")

    def weight_backward(self, microbatch: int, loss_point: int) -> None:
        """The weight gradients a deferred ``backward`` left (a ``W`` action)."""
        raise NotImplementedError(f"rule {self.plan.rule} has no deferred weight gradients")

    def second_pass(self, microbatch: int, message: torch.Tensor) -> torch.Tensor | None:
        """A top-down rule's second forward pass (a ``G`` action)."""
        raise NotImplementedError(f"rule {self.plan.rule} has no second pass")

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without graphs: x(last), or the prediction if the run ends the network."""
        raise NotImplementedError

    @property
    def outstanding(self) -> int:
        """Microbatches whose state is still held (an action of theirs is still to run)."""
        raise NotImplementedError

    def train_microbatch(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float = 1.0
    ) -> ForwardResult:
        """Forward and every other action of one microbatch over a run holding every block."""
        if self.first != 0 or not self.is_last:
            raise RuntimeError("train_microbatch needs the whole model; use the pipeline")
        result = self.forward(0, inputs, targets, loss_scale, eager=True)
        assert not self.outstanding, "a whole-model run finishes its microbatch in forward"
        return result

    def block_forward(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Block t's forward as this engine runs it: with ``checkpoint_blocks``, torch's
        non-reentrant checkpoint keeps only the block's input and recomputes its forward in each
        backward through it (same RNG state, same autocast)."""
        if not self.compute.checkpoint_blocks:
            return self.model.block_forward(t, x)
        return torch.utils.checkpoint.checkpoint(
            self.model.block_forward, t, x, use_reentrant=False
        )

    def hold(self, tensor: torch.Tensor):
        """Keep ``tensor`` (``.tensor`` of the handle) and count it as held activations."""
        if self.memory is None:
            return SimpleNamespace(tensor=tensor)
        return self.memory.hold(tensor)

    def _hooks(self):
        return self.memory.hooks() if self.memory is not None else nullcontext()


EngineFactory = Callable[[BlockModel, Plan, EngineOptions], Engine]
