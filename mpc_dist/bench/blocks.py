"""The bench's real blocks (``--real``): the residual MLP block, or the Block of a timm Vision
Transformer (``vit_base_patch16_224``, ``vit_large_patch16_224``) at its real width, on states of
``--tokens`` tokens. Every system runs the same blocks; ours as a pipeline model whose stage
allocates only its own blocks, the baselines block by block."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from ..core import ComputeOptions
from ..models import BlockModel, pipeline_model
from ..models.mlp import MLPBlock, NormLinearHead
from ..models.vit import ClassTokenHead
from .cases import TIMM_VITS, BenchOptions

NUM_CLASSES = 10


@functools.cache
def _timm_vit(block: str) -> nn.Module:
    """The timm ViT of ``--block`` with one block, on the meta device (its shape only)."""
    import timm

    with torch.device("meta"):
        return timm.create_model(TIMM_VITS[block], pretrained=False, depth=1, num_classes=0)


def state_shape(options: BenchOptions) -> tuple[int, ...]:
    """One sample's state between blocks: (width,), or (tokens, the ViT's width)."""
    if options.real and options.block in TIMM_VITS:
        return (options.tokens, _timm_vit(options.block).embed_dim)
    return (options.width,)


def real_block(options: BenchOptions, index: int, device: torch.device | str = "cpu") -> nn.Module:
    """Block ``index`` of ``--real``, allocated on ``device`` (``meta``: its shape only) and
    initialised from its index."""
    torch.manual_seed(index)
    if options.block == "mlp":
        with torch.device(device):
            return MLPBlock(options.width, options.hidden)
    block = copy.deepcopy(_timm_vit(options.block).blocks[0]).to_empty(device=device)
    with torch.no_grad():
        for name, module in block.named_modules():
            if not _init_module(name, module) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return block


def _head(shape: tuple[int, ...]) -> nn.Module:
    """A classifier of the state: norm + linear, of the class token for ViT states."""
    if len(shape) == 1:
        return NormLinearHead(shape[0], NUM_CLASSES)
    return ClassTokenHead(nn.LayerNorm(shape[-1]), nn.Linear(shape[-1], NUM_CLASSES))


def _init_module(name: str, module: nn.Module) -> bool:
    """timm's ViT initialisation for linear layers; everything else resets itself."""
    if isinstance(module, nn.Linear):
        from timm.models.vision_transformer import init_weights_vit_timm

        init_weights_vit_timm(module, name)
        return True
    return False


def real_model(options: BenchOptions, aux_heads: bool) -> BlockModel:
    """Our pipeline model of ``options.blocks`` real blocks, built on the meta device: a stage
    allocates and initialises only its own part (``build_stage``)."""
    shape = state_shape(options)
    init = _init_module if options.block in TIMM_VITS else None
    blocks = [real_block(options, t, "meta") for t in range(options.blocks)]
    with torch.device("meta"):
        return pipeline_model(
            nn.Identity(),
            blocks,
            _head(shape),
            shape,
            aux_head=_head,
            head_mode="aux" if aux_heads else "shared",
            init_module=init,
        )


class Autocast(nn.Module):
    """A block computing under autocast that hands its output on in the compute dtype, as our
    engine hands states on (the baselines' blocks under ``--precision bf16``)."""

    def __init__(self, block: nn.Module, compute: ComputeOptions) -> None:
        super().__init__()
        self.block, self.compute = block, compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.compute.autocast():
            out = self.block(x)
        return out.to(self.compute.autocast_dtype)
