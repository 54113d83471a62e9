"""PEPITA (Dellaferrera & Kreiman 2022; Srinivasan et al. 2024): two forward passes, no backward
pass. The first pass gives the output error e = softmax(y_hat) - onehot(y); the last stage sends
e to the first (the one top-down message per microbatch), which feeds the input modulated by a
fixed random feedback matrix F, x_err = x + F e, through a second pass. Each layer learns from
the difference of its two activations, dW_l = (h_l - h_l_err) (h_{l-1}_err)^T (the first layer
with x_err), the output layer from the modulated error, dW_L = e_err (h_{L-1}_err)^T; biases
likewise. F ~ U[-1, 1] x 0.05 sqrt(6 / d_in), the original code's scale.

Blocks are single linear layers with their nonlinearity (``model.name: relu_mlp``), the head
one linear layer. The engine implements the contract's ``forward``, ``second_pass`` and ``infer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..core import Engine, EngineOptions, ForwardResult, Plan
from ..models import BlockModel
from .common import add_linear_grads, draws, hooked, loss_factor
from .forward_gradient import linear_layers

FEEDBACK_SCALE = 0.05


def check_pepita(model: BlockModel) -> None:
    """One linear layer per block, a linear head; one line naming the field and the fix."""
    for t in model.block_indices:
        if len(linear_layers(model, t)) != 1:
            raise ConfigError(
                f"horizon.rule=pepita: block {t} is not one linear layer and its nonlinearity; "
                f"use model.name=relu_mlp"
            )
    if model.head is not None and not isinstance(model.head, nn.Linear):
        raise ConfigError("horizon.rule=pepita: the head is not one linear layer; "
                          "use model.name=relu_mlp")  # fmt: skip


def feedback_matrix(seed: int, inputs: int, classes: int) -> torch.Tensor:
    """The fixed F (inputs x classes), the same on every layout."""
    scale = FEEDBACK_SCALE * math.sqrt(6 / inputs)
    uniform = torch.rand(inputs, classes, generator=draws(seed, -2, 0), dtype=torch.float64)
    return (2 * uniform - 1) * scale


@dataclass
class _Held:
    """A microbatch between its two passes."""

    outputs: list = field(default_factory=list)  # h_l of the first pass (handles: ``.tensor``)
    inputs: torch.Tensor | None = None  # x (first stage)
    targets: torch.Tensor | None = None  # y (last stage)
    scale: float = 1.0


class PepitaEngine(Engine):
    def __init__(self, model: BlockModel, plan: Plan, options: EngineOptions | None = None) -> None:
        check_pepita(model)
        super().__init__(model, plan, options)
        seed = self.options.seed
        self.feedback = None
        if self.first == 0:
            d_in = math.prod(model.input_shape)
            param = next(model.parameters())
            feedback = feedback_matrix(seed, d_in, model.num_classes)
            self.feedback = feedback.to(param.device, param.dtype)
        self._held: dict[int, _Held] = {}

    @torch.no_grad()
    def forward(
        self,
        microbatch: int,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_scale: float = 1.0,
        eager: bool = True,
    ) -> ForwardResult:
        """The first pass; on the last stage, the error it sends to the first."""
        scale = loss_factor(self.options.scale_loss, loss_scale, inputs.device)
        held = self._held[microbatch] = _Held(scale=scale)
        held.inputs = inputs if self.first == 0 else None
        x = inputs
        with self.compute.autocast():
            for t in range(self.first, self.last):
                x = self.model.block_forward(t, x)
                held.outputs.append(self.hold(x))
        if not self.is_last:
            return ForwardResult(x, None, {}, {})
        held.targets = targets
        logits = self.model.head(x)
        error = logits.softmax(-1) - F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
        loss = F.cross_entropy(logits.float(), targets) * loss_scale
        result = ForwardResult(None, logits, {self.plan.num_blocks: loss}, {}, top_down=error)
        if eager and self.first == 0:
            self.second_pass(microbatch, error)
        return result

    @torch.no_grad()
    def second_pass(self, microbatch: int, message: torch.Tensor) -> torch.Tensor | None:
        """The modulated pass over this run, accumulating its updates into ``.grad``. The first
        stage gets the error e, the others the state x_err from below; returns the state for the
        stage above (None on the last)."""
        held = self._held.pop(microbatch)
        if self.first == 0:
            x = held.inputs + (message.to(self.feedback.dtype) @ self.feedback.T).view_as(
                held.inputs
            )
        else:
            x = message
        weight = held.scale / len(x)  # the update is a mean over the microbatch
        inputs: list[torch.Tensor] = []  # what each block's linear layer saw
        with self.compute.autocast():
            for t, h in zip(range(self.first, self.last), held.outputs, strict=True):
                (layer,) = linear_layers(self.model, t)
                with hooked([layer], lambda module, i, o: inputs.append(i[0])):
                    modulated = self.model.block_forward(t, x)
                add_linear_grads(layer, (h.tensor - modulated) * weight, inputs[-1])
                x = modulated
            if not self.is_last:
                return x
            logits = self.model.head(x)
            error = logits.softmax(-1) - F.one_hot(held.targets, logits.shape[-1]).to(logits.dtype)
            add_linear_grads(self.model.head, error * weight, x)
        return None

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        with self.compute.autocast():
            for t in range(self.first, self.last):
                x = self.model.block_forward(t, x)
            return self.model.head(x) if self.is_last else x

    @property
    def outstanding(self) -> int:
        return len(self._held)
