"""Pieces the block-local rules share."""

from __future__ import annotations

import torch

from ..models import BlockModel

EPS = 1e-8


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
