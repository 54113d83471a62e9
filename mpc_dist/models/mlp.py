"""Fully connected families: the paper's deep linear residual net, a pre-norm residual MLP, and
plain ReLU layers (the networks of forward-forward and PEPITA)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import BlockModel, ModelError, assemble


class LinearResidual(nn.Module):
    """x + W~ x / T: the deep linear residual net of the paper's analysis (W(t) = I + W~(t)/T)."""

    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.linear(x)


class MLPBlock(nn.Module):
    """Pre-norm residual MLP block.

    The norm has no affine parameters: fc1 absorbs them, and without them a stream that only
    takes weight gradients here needs no input-gradient product through fc1 (spec section 2,
    cost): receding h = 2 then costs about what back-propagation costs.
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class NormLinearHead(nn.Sequential):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__(nn.LayerNorm(width), nn.Linear(width, num_classes))


def _stem(spec: ModelConfig, input_shape: tuple[int, ...]) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), spec.width))


def build_deep_linear(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    stem = _stem(spec, input_shape)
    scale = 1.0 / spec.num_blocks if spec.scaled else 1.0
    blocks = [LinearResidual(spec.width, scale) for _ in range(spec.num_blocks)]
    head = nn.Linear(spec.width, num_classes)
    return assemble(
        spec, stem, blocks, head, input_shape, lambda shape: nn.Linear(shape[0], num_classes)
    )


def build_residual_mlp(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    stem = _stem(spec, input_shape)
    blocks = [MLPBlock(spec.width, spec.hidden) for _ in range(spec.num_blocks)]
    head = NormLinearHead(spec.width, num_classes)
    return assemble(
        spec, stem, blocks, head, input_shape, lambda shape: NormLinearHead(shape[0], num_classes)
    )


RELU_MLP_INITS = ("torch", "normal", "he_uniform")


def build_relu_mlp(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    """Block t = ReLU(W_t x + b_t), no residual, no norm (forward-forward's 4 x 2000 network is
    ``num_blocks: 4, width: 2000``): the input is flattened, the head is linear.

    ``model.kwargs``: ``init`` is torch's default (``torch``), N(0, 1/fan_in) weights with zero
    biases and a zero head (``normal``: Hinton's forward-forward code) or U(+-sqrt(6/fan_in)) with
    zero biases (``he_uniform``: the PEPITA codes); ``bias: false`` drops the biases (PEPITA's
    networks have none)."""
    options = dict(spec.kwargs or {})
    init, bias = options.pop("init", "torch"), options.pop("bias", True)
    if options or init not in RELU_MLP_INITS or not isinstance(bias, bool):
        raise ModelError(
            f"model.kwargs={spec.kwargs}: relu_mlp takes init ({'|'.join(RELU_MLP_INITS)}) and "
            f"bias (true|false)"
        )
    widths = [math.prod(input_shape)] + [spec.width] * spec.num_blocks
    layers = zip(widths, widths[1:], strict=False)
    blocks = [nn.Sequential(nn.Linear(a, b, bias=bias), nn.ReLU()) for a, b in layers]
    head = nn.Linear(spec.width, num_classes, bias=bias)
    aux = lambda shape: nn.Linear(shape[0], num_classes, bias=bias)
    initialise = None if init == "torch" else functools.partial(_init_linear, init)
    return assemble(spec, nn.Flatten(), blocks, head, input_shape, aux, initialise)


@torch.no_grad()
def _init_linear(scheme: str, name: str, module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    fan_in = module.in_features
    if scheme == "normal":
        std = 0.0 if name == "head" else fan_in**-0.5
        module.weight.normal_(0.0, std) if std else module.weight.zero_()
    else:
        limit = math.sqrt(6.0 / fan_in)
        module.weight.uniform_(-limit, limit)
    if module.bias is not None:
        module.bias.zero_()
    return True
