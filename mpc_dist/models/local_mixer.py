"""LocalMixer (Ren, Kornblith, Liao & Hinton 2023, section 5), the MLP-Mixer built for local
losses: the image cut into P non-overlapping patches (tokens); block 0 mixes channels (a linear
layer, then a grouped linear layer within G groups), every later block mixes tokens (one linear
layer across them), then channels (linear, then grouped linear) with a residual connection;
LayerNorm (no affine parameters) before and after every linear layer, ReLU after each. A
block's state is (P, G, C), C = width / G channels per group.

Every linear layer with the LayerNorm after it and its ReLU is a ``Site``: where forward
gradient perturbs (the LayerNorm's output) and what it trains. ``LocalMixerHead`` is the
per-block loss head (LayerNorm per patch and group, the mean over patches, one linear layer) and
gives the paper's replicated losses, one per (patch, group) (equations 4-5).

Built from ``model.name: local_mixer``: ``num_blocks`` blocks, ``width`` channels, ``hidden``
the channel-mixing layers' width, ``patch_size`` pixels per patch side, ``kwargs: {groups: G}``.
The paper's M/1/16 on MNIST: 1 block, width 512, hidden 512, patch_size 28, 16 groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import BlockModel, ModelError, assemble


class Patches(nn.Module):
    """(C, H, W) -> (P, p * p * C): non-overlapping p x p patches, each flattened (h, w, c)."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)


class GroupLinear(nn.Module):
    """(..., G, i) -> (..., G, o): a separate linear map within each of G groups."""

    def __init__(self, groups: int, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, inputs, outputs))
        self.bias = nn.Parameter(torch.empty(groups, outputs))
        self.fan_in = inputs
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...gi,gio->...go", x, self.weight) + self.bias


class TokenLinear(nn.Module):
    """(B, P, D) -> (B, P, D): one linear map across the P tokens, shared by all channels."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.mix = nn.Linear(tokens, tokens)
        self.fan_in = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x.transpose(1, 2)).transpose(1, 2)


class Site(nn.Module):
    """ReLU(LayerNorm(linear(x)) [+ residual]): forward gradient perturbs the LayerNorm's
    output (``norm``), and ``spread`` maps the per-(sample, patch, group) directional
    derivatives of the local losses onto that output: a token-mixing unit feeds every group of
    its patch, a channel-mixing unit the group its hidden unit belongs to, a grouped unit its own.
    """

    def __init__(self, kind: str, linear: nn.Module, width: int, groups: int) -> None:
        super().__init__()
        self.kind, self.groups = kind, groups
        self.linear = linear
        self.norm = nn.LayerNorm(width, elementwise_affine=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        z = self.norm(self.linear(x))
        return F.relu(z if residual is None else z + residual)

    def spread(self, g: torch.Tensor) -> torch.Tensor:
        """(B, P, G) -> a tensor that broadcasts to the LayerNorm's output."""
        if self.kind == "token":  # (B, P, D)
            return g.sum(-1, keepdim=True)
        if self.kind == "channel":  # (B, P, H), H split into G groups
            return g.repeat_interleave(self.norm.normalized_shape[0] // self.groups, -1)
        return g.unsqueeze(-1)  # grouped: (B, P, G, C)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


class FirstBlock(nn.Module):
    """Block 0: patches (P, patch_dim) -> channel mixing -> grouped mixing -> (P, G, C)."""

    def __init__(self, patch_dim: int, width: int, hidden: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.channels = Site("channel", nn.Linear(patch_dim, hidden), hidden, groups)
        self.grouped = Site(
            "group", GroupLinear(groups, hidden // groups, width // groups), width // groups, groups
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.channels(_norm(x))
        h = h.reshape(*h.shape[:-1], self.groups, -1)
        return self.grouped(_norm(h))


class MixerBlock(nn.Module):
    """Blocks 1..: token mixing, channel mixing, grouped mixing plus the block's input."""

    def __init__(self, tokens: int, width: int, hidden: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.tokens = Site("token", TokenLinear(tokens), width, groups)
        self.channels = Site("channel", nn.Linear(width, hidden), hidden, groups)
        self.grouped = Site(
            "group", GroupLinear(groups, hidden // groups, width // groups), width // groups, groups
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(_norm(x.flatten(2)))
        h = self.channels(_norm(h))
        h = h.reshape(*h.shape[:-1], self.groups, -1)
        return self.grouped(_norm(h), residual=x)


class LocalMixerHead(nn.Module):
    """A block's loss head on its state (P, G, C): LayerNorm per patch and group, the mean over
    patches, one linear layer on the groups side by side."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_norm(x).mean(1).flatten(1))

    def replicated_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, P, G): each sample's cross-entropy, once per patch and group, where loss (p, g)
        sees only the change of its own patch's group (the stop-gradient aggregator,
        equations 4-5): the value is the sample's loss, its derivative along a change dx of
        the state that of the linear head through patch p, group g of dx."""
        z = _norm(x)
        logits = self.linear(z.mean(1).flatten(1))
        loss = F.cross_entropy(logits, targets, reduction="none")
        error = (logits.softmax(-1) - F.one_hot(targets, logits.shape[-1]).to(z.dtype)).detach()
        slope = (error @ self.linear.weight.detach()).view(len(z), *z.shape[2:])  # (B, G, C)
        change = torch.einsum("npgc,ngc->npg", z - z.detach(), slope) / z.shape[1]
        return loss.detach()[:, None, None] + change


def init_module(name: str, module: nn.Module) -> bool:
    """The official code's "kaiming" scheme: weights ~ N(0, min(2 / sqrt(fan_in), 0.1)^2),
    biases zero."""
    if isinstance(module, nn.Linear | GroupLinear):
        fan_in = module.in_features if isinstance(module, nn.Linear) else module.fan_in
        with torch.no_grad():
            module.weight.normal_(0.0, min(2 / math.sqrt(fan_in), 0.1))
            module.bias.zero_()
        return True
    return False


def build_local_mixer(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    options = dict(spec.kwargs or {})
    groups = options.pop("groups", 1)
    channels, height, width = input_shape
    p = spec.patch_size
    if options or not isinstance(groups, int) or groups < 1:
        raise ModelError(f"model.kwargs={spec.kwargs}: local_mixer takes groups (an int >= 1)")
    if height % p or width % p:
        raise ModelError(f"model.patch_size={p}: must divide the image size {height}x{width}")
    if spec.width % groups or spec.hidden % groups:
        raise ModelError(f"model.kwargs.groups={groups}: must divide model.width and model.hidden")
    tokens = (height // p) * (width // p)
    blocks = [FirstBlock(p * p * channels, spec.width, spec.hidden, groups)]
    blocks += [
        MixerBlock(tokens, spec.width, spec.hidden, groups) for _ in range(spec.num_blocks - 1)
    ]
    head = LocalMixerHead(spec.width, num_classes)
    aux = lambda shape: LocalMixerHead(shape[1] * shape[2], num_classes)  # noqa: E731
    return assemble(spec, Patches(p), blocks, head, input_shape, aux, init_module)
