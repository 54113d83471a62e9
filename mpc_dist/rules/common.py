"""Pieces the block-local rules share."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import nn

from ..models import BlockModel

EPS = 1e-8


def draws(seed: int, t: int, k: int) -> torch.Generator:
    """The random stream of the k-th forward of block t (t < 0: a rule's own streams), seeded by
    (seed, t, k): the same noise, negatives and feedback whatever the stage layout."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{t}/{k}".encode()))


def on_device(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator that draws on ``device``: ``generator`` itself on the CPU; elsewhere a new
    one seeded as ``generator`` was (``draws``' seed), so the noise is made where it is used
    with no copy. A CUDA generator's numbers differ from the CPU's (another algorithm), but
    they too depend on the seed only, not on the stage layout. Call it once per stream."""
    if device.type == "cpu":
        return generator
    return torch.Generator(device).manual_seed(generator.initial_seed())


def loss_factor(
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None,
    scale: float,
    device: torch.device,
) -> float:
    """What a microbatch's gradients are multiplied by: its share, times the fp16 loss scale.

    The share is scaled on ``device``, where the loss scale lives, and read back with a
    synchronising ``float``: scaling a CPU tensor would copy a CUDA scale with
    ``non_blocking=True`` and multiply before the copy has landed."""
    if scale_loss is None:
        return scale
    return float(scale_loss(torch.tensor(scale, dtype=torch.float64, device=device)))


def add_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    """Accumulate a gradient formed by hand into ``param.grad``."""
    if not param.requires_grad:
        return
    grad = grad.to(param.dtype)
    param.grad = grad if param.grad is None else param.grad + grad


def add_linear_grads(layer: nn.Linear, delta: torch.Tensor, inputs: torch.Tensor) -> None:
    """A linear layer's gradient from its output's estimated gradient ``delta`` (samples, ...,
    out) and its inputs: weight += delta^T inputs, bias += the sum of delta."""
    add_grad(layer.weight, torch.einsum("...o,...i->oi", delta, inputs))
    if layer.bias is not None:
        add_grad(layer.bias, delta.reshape(-1, delta.shape[-1]).sum(0))


def normalise_length(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2)) per sample: the next block sees the state's orientation only."""
    dims = tuple(range(1, x.ndim))
    return x / x.square().mean(dim=dims, keepdim=True).add(EPS).sqrt()


def block_and_head_parameters(model: BlockModel, t: int) -> list[torch.nn.Parameter]:
    """Block t's trainable parameters and those of the head at its output, loss point t + 1."""
    head, trainable = model.loss_head(t + 1)
    params = model.block_parameters(t) + (list(head.parameters()) if trainable else [])
    return [p for p in params if p.requires_grad]


def accumulate(loss: torch.Tensor, params: list[torch.nn.Parameter], factor: float) -> None:
    """Add d(factor x loss)/d params into .grad, through this graph only."""
    if params:
        torch.autograd.backward(loss * factor, inputs=params)


class hooked(ExitStack):
    """Forward hooks on ``layers`` for the duration of a with-block."""

    def __init__(self, layers: list[nn.Module], hook) -> None:
        super().__init__()
        for layer in layers:
            self.callback(layer.register_forward_hook(hook).remove)
