"""The engine of the block-local rules: each block is trained by its own rule's loss at its
output, and nothing crosses a block boundary backwards (the plan is h = 1's).

It implements the engine contract (``mpc_dist.core.Engine``), so the pipeline runtime and the
single-process runner drive it unchanged: ``forward`` runs a microbatch through the run of
blocks and computes what each block's update needs (a graph for autograd-local rules, a
forward-mode directional derivative for forward gradients); ``backward(microbatch, s)``
applies block s-1's update, a stage-local action that receives and sends nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..core import Engine, EngineOptions, ForwardResult, Plan
from ..models import BlockModel
from .common import draws, loss_factor

BlockForward = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class LocalStep:
    """What a rule computed for one block and microbatch."""

    output: torch.Tensor  # the block's output x(t+1) (the next block's state)
    loss: torch.Tensor  # the block's local loss (mean over the microbatch)
    logits: torch.Tensor | None  # the prediction, at the last block
    update: Callable[[float], None]  # accumulate the block's (and its head's) gradients, scaled
    held: tuple[torch.Tensor, ...] = ()  # kept for the update outside autograd (counted as held)


class LocalRule(Protocol):
    name: str
    samples_per_input: int  # states per input sample (forward-forward: positive, negative, neutral)

    def inputs(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """What block 0 trains on (its stem sees this)."""

    def infer_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What block 0 sees at inference."""

    def block_input(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """What block t sees of the state x(t) (a normalisation between blocks)."""

    def step(
        self,
        model: BlockModel,
        t: int,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        forward: BlockForward,
    ) -> LocalStep:
        """Block t's output, loss and update; ``forward(t, x)`` is the block's forward as the
        engine runs it (checkpointed when asked)."""

    def predict(self, model: BlockModel, state: torch.Tensor) -> torch.Tensor:
        """The prediction from x(T) at inference."""


class PlainRule:
    """A local rule's defaults: one state per sample, inputs as they are, the head predicts."""

    samples_per_input = 1

    def inputs(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x

    def infer_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def block_input(self, t: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def predict(self, model: BlockModel, state: torch.Tensor) -> torch.Tensor:
        return model.head(state)


class LocalEngine(Engine):
    """The block-local rules (``ff``, ``sff``, ``forward_gradient``): ``rule`` says what each
    block computes and how it updates."""

    def __init__(
        self, model: BlockModel, plan: Plan, options: EngineOptions, rule: LocalRule
    ) -> None:
        if not plan.is_local:
            raise ValueError(f"LocalEngine runs block-local rules, not {plan.rule}")
        super().__init__(model, plan, options)
        self.rule = rule
        self._updates: dict[int, dict[int, Callable[[], None]]] = {}
        self._forwards = dict.fromkeys(range(-1, self.last), 0)  # -1: the input transform

    @property
    def samples_per_input(self) -> int:
        return self.rule.samples_per_input

    def forward(
        self,
        microbatch: int,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_scale: float = 1.0,
        eager: bool = True,
    ) -> ForwardResult:
        updates = self._updates.setdefault(microbatch, {})  # loss point -> its block's update
        x = inputs
        if self.first == 0:
            x = self.rule.inputs(x, targets, self._generator(-1))
        losses, logits = {}, None
        factor = loss_factor(self.options.scale_loss, loss_scale, inputs.device)
        for t in range(self.first, self.last):
            with self._hooks(), self.compute.autocast():
                step = self.rule.step(
                    self.model, t, x.detach(), targets, self._generator(t), self.block_forward
                )
            s = t + 1
            losses[s] = step.loss.detach() * loss_scale
            held = [self.hold(h) for h in step.held]
            # the update keeps its step (and the count of what it holds) alive until it runs
            updates[s] = lambda step=step, held=held: step.update(factor)
            if s == self.plan.num_blocks:
                logits = step.logits.detach()
            x = self.compute.state(step.output)
            if eager:
                updates.pop(s)()
        if not updates:
            del self._updates[microbatch]
        return ForwardResult(None if self.is_last else x, logits, losses, {})

    def backward(
        self,
        microbatch: int,
        loss_point: int,
        cotangent: torch.Tensor | None = None,
        defer_weights: bool = False,
    ) -> None:
        """Apply block ``loss_point - 1``'s update; nothing continues below it."""
        updates = self._updates[microbatch]
        updates.pop(loss_point)()
        if not updates:
            del self._updates[microbatch]

    def weight_backward(self, microbatch: int, loss_point: int) -> None:
        """Nothing is deferred: a local rule's update is all weight gradient."""

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        with self.compute.autocast():
            if self.first == 0:
                x = self.rule.infer_inputs(x)
            for t in range(self.first, self.last):
                x = self.compute.state(self.model.block_forward(t, self.rule.block_input(t, x)))
            return self.rule.predict(self.model, x) if self.is_last else x

    @property
    def outstanding(self) -> int:
        return len(self._updates)

    def _generator(self, t: int) -> torch.Generator:
        k = self._forwards[t]
        self._forwards[t] += 1
        return draws(self.options.seed, t, k)
