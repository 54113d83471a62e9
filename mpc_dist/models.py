"""Pipeline-ready models: a stem, T blocks, a head, and optional per-loss-point auxiliary heads.

Blocks live in an ``nn.ModuleDict`` keyed by their global index, so parameter names
(``blocks.5.fc1.weight``) survive splitting a model into pipeline stages. The stem belongs to
block 0; on a stage that does not hold block 0 (or the head) those parts are ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

HEAD_MODES = ("shared", "aux")
MODELS = ("deep_linear", "residual_mlp", "vit_tiny", "vit_b_16", "vit_l_16", "resnet18", "resnet50")


class ModelError(ValueError):
    """A model configuration that cannot be built; the message names the field and the fix."""


class BlockModel(nn.Module):
    def __init__(
        self,
        stem: nn.Module | None,
        blocks: dict[int, nn.Module],
        head: nn.Module | None,
        aux_heads: dict[int, nn.Module],
        num_blocks: int,
        head_mode: str,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleDict({str(t): b for t, b in blocks.items()})
        self.head = head
        self.aux_heads = nn.ModuleDict({str(s): h for s, h in aux_heads.items()})
        self.num_blocks = num_blocks
        self.head_mode = head_mode
        self.input_shape: tuple[int, ...] = ()  # (C, H, W) of one sample
        self.state_shapes: list[tuple[int, ...]] = []  # shape of x(0) .. x(T), one sample

    @property
    def block_indices(self) -> list[int]:
        return sorted(int(t) for t in self.blocks)

    def block_forward(self, t: int, x: torch.Tensor) -> torch.Tensor:
        if t == 0:
            x = self.stem(x)
        return self.blocks[str(t)](x)

    def block_parameters(self, t: int) -> list[nn.Parameter]:
        params = list(self.blocks[str(t)].parameters())
        if t == 0:
            params = list(self.stem.parameters()) + params
        return params

    def loss_head(self, s: int) -> tuple[nn.Module, bool]:
        """The head evaluated at loss point s, and whether l_s trains it.

        A shared head at s < T is read-only: it gets gradient from l_T alone (spec section 1).
        """
        if s == self.num_blocks:
            return self.head, True
        if self.head_mode == "aux":
            return self.aux_heads[str(s)], True
        return self.head, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.block_indices:
            x = self.block_forward(t, x)
        return self.head(x)

    def split(self, first: int, last: int, head_copy: bool = False) -> BlockModel:
        """The part holding blocks [first, last) with the modules it needs (shared, not copied).

        ``head_copy``: keep the shared head below the last block, for loss points s < T.
        """
        part = BlockModel(
            self.stem if first == 0 else None,
            {t: self.blocks[str(t)] for t in range(first, last)},
            self.head if last == self.num_blocks or head_copy else None,
            {s: h for s, h in self._aux_items() if first < s <= last},
            self.num_blocks,
            self.head_mode,
        )
        part.input_shape, part.state_shapes = self.input_shape, self.state_shapes
        return part

    def _aux_items(self) -> Iterator[tuple[int, nn.Module]]:
        return ((int(s), h) for s, h in self.aux_heads.items())


# ----------------------------------------------------------------------------- blocks and heads


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


class PoolHead(nn.Sequential):
    """Aux head for feature maps: global average pool + LayerNorm + Linear."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(channels),
            nn.Linear(channels, num_classes),
        )  # fmt: skip


class ViTStem(nn.Module):
    """Patch embedding + class token + position embedding of torchvision's VisionTransformer."""

    def __init__(self, vit: nn.Module, in_channels: int) -> None:
        super().__init__()
        self.image_size, self.patch_size = vit.image_size, vit.patch_size
        self.conv_proj = vit.conv_proj
        if in_channels != self.conv_proj.in_channels:
            self.conv_proj = nn.Conv2d(
                in_channels, vit.hidden_dim, kernel_size=self.patch_size, stride=self.patch_size
            )
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (n, patches, hidden)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ClassTokenHead(nn.Module):
    def __init__(self, norm: nn.Module, linear: nn.Module) -> None:
        super().__init__()
        self.norm, self.linear = norm, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x)[:, 0])


# ----------------------------------------------------------------------------- builders


def _assemble(
    spec: ModelConfig,
    stem: nn.Module,
    blocks: list[nn.Module],
    head: nn.Module,
    input_shape: tuple[int, ...],
    make_aux_head,
) -> BlockModel:
    T = len(blocks)
    shapes = _state_shapes(stem, blocks, input_shape)
    if spec.head == "shared":
        for s in range(1, T):
            if shapes[s] != shapes[T]:
                raise ModelError(
                    f"model.head=shared: {spec.name}'s state x({s}) has shape {shapes[s]} but the "
                    f"head takes {shapes[T]}; set model.head=aux"
                )
    aux = {s: make_aux_head(shapes[s]) for s in range(1, T)} if spec.head == "aux" else {}
    model = BlockModel(stem, dict(enumerate(blocks)), head, aux, T, spec.head)
    model.input_shape, model.state_shapes = tuple(input_shape), shapes
    return model


@torch.no_grad()
def _state_shapes(stem: nn.Module, blocks: list[nn.Module], input_shape) -> list[tuple[int, ...]]:
    """Shapes of x(0) .. x(T) (without the batch dimension), from one tiny forward pass."""
    modules = [stem, *blocks]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()  # keep batch-norm running statistics untouched
    x = stem(torch.zeros(1, *input_shape))
    shapes = [tuple(x.shape[1:])]
    for block in blocks:
        x = block(x)
        shapes.append(tuple(x.shape[1:]))
    for m, mode in zip(modules, modes, strict=True):
        m.train(mode)
    return shapes


_FIXED_DEPTH = {"resnet18": 8, "resnet50": 16, "vit_b_16": 12, "vit_l_16": 24}


def num_blocks_of(spec: ModelConfig) -> int:
    """T, the number of blocks the model named by ``spec`` has."""
    return _FIXED_DEPTH.get(spec.name, spec.num_blocks)


def build_model(spec: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> BlockModel:
    """Build the model a config names, for inputs of ``input_shape`` (C, H, W)."""
    if spec.head not in HEAD_MODES:
        raise ModelError(f"model.head={spec.head!r}: unknown; use one of {HEAD_MODES}")
    if spec.name in ("deep_linear", "residual_mlp"):
        return _build_mlp(spec, input_shape, num_classes)
    if spec.name.startswith("vit_"):
        return _build_vit(spec, input_shape, num_classes)
    if spec.name.startswith("resnet"):
        return _build_resnet(spec, input_shape, num_classes)
    raise ModelError(f"model.name={spec.name!r}: unknown model; use one of {MODELS}")


def _build_mlp(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    if spec.num_blocks < 1:
        raise ModelError(f"model.num_blocks={spec.num_blocks}: must be >= 1")
    stem = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), spec.width))
    if spec.name == "deep_linear":
        scale = 1.0 / spec.num_blocks if spec.scaled else 1.0
        blocks = [LinearResidual(spec.width, scale) for _ in range(spec.num_blocks)]
        head = nn.Linear(spec.width, num_classes)
        make_aux = lambda shape: nn.Linear(shape[0], num_classes)  # noqa: E731
    else:
        blocks = [MLPBlock(spec.width, spec.hidden) for _ in range(spec.num_blocks)]
        head = NormLinearHead(spec.width, num_classes)
        make_aux = lambda shape: NormLinearHead(shape[0], num_classes)  # noqa: E731
    return _assemble(spec, stem, blocks, head, input_shape, make_aux)


def _build_vit(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    from torchvision.models import vision_transformer as tv

    channels, height, _ = input_shape
    if spec.name == "vit_tiny":
        vit = tv.VisionTransformer(
            image_size=height, patch_size=spec.patch_size, num_layers=spec.num_blocks,
            num_heads=spec.num_heads, hidden_dim=spec.width, mlp_dim=spec.hidden,
            num_classes=num_classes,
        )  # fmt: skip
        if height % spec.patch_size:
            raise ModelError(
                f"model.patch_size={spec.patch_size}: must divide the image size {height}"
            )
    elif spec.name in ("vit_b_16", "vit_l_16"):
        image_size = max(16, round(height / 16) * 16)
        vit = getattr(tv, spec.name)(weights=None, image_size=image_size, num_classes=num_classes)
    else:
        raise ModelError(f"model.name={spec.name!r}: unknown model; use one of {MODELS}")
    stem = ViTStem(vit, channels)
    blocks = list(vit.encoder.layers)
    head = ClassTokenHead(vit.encoder.ln, vit.heads)
    hidden = vit.hidden_dim
    make_aux = lambda shape: ClassTokenHead(nn.LayerNorm(hidden), nn.Linear(hidden, num_classes))  # noqa: E731
    return _assemble(spec, stem, blocks, head, input_shape, make_aux)


def _build_resnet(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    from torchvision import models as tv

    if spec.name not in ("resnet18", "resnet50"):
        raise ModelError(f"model.name={spec.name!r}: unknown model; use one of {MODELS}")
    net = getattr(tv, spec.name)(weights=None, num_classes=num_classes)
    channels, height, _ = input_shape
    if height <= 64:  # small images (MNIST, CIFAR): 3x3 stem, no max-pool, as is usual
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    head = nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
    make_aux = lambda shape: PoolHead(shape[0], num_classes)  # noqa: E731
    return _assemble(spec, stem, blocks, head, input_shape, make_aux)
