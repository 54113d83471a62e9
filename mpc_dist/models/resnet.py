"""ResNets from torchvision, split at residual blocks (widths change: they need aux heads)."""

from __future__ import annotations

import re

from torch import nn

from ..config import ModelConfig
from .base import BlockModel, assemble


class PoolHead(nn.Sequential):
    """Aux head for feature maps: global average pool + LayerNorm + Linear."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.LayerNorm(channels),
            nn.Linear(channels, num_classes),
        )


def build_torchvision_resnet(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    from torchvision import models as tv

    net = getattr(tv, spec.name)(weights=None, num_classes=num_classes)
    channels, height, _ = input_shape
    if height <= 64:  # small images (MNIST, CIFAR): 3x3 stem, no max-pool, as is usual
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    layers = (net.layer1, net.layer2, net.layer3, net.layer4)
    blocks = [b for layer in layers for b in layer]
    head = nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
    offsets = [sum(len(layer) for layer in layers[:i]) for i in range(4)]

    def weight_name(key: str) -> str | None:
        """torchvision's names (``layer2.1.conv1.weight``) to ours (``blocks.3.conv1.weight``)."""
        if match := re.fullmatch(r"layer(\d)\.(\d+)\.(.*)", key):
            layer, index, rest = int(match[1]) - 1, int(match[2]), match[3]
            return f"blocks.{offsets[layer] + index}.{rest}"
        for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1."), ("fc.", "head.2.")):
            if key.startswith(old):
                return new + key.removeprefix(old)
        return key

    return assemble(
        spec,
        stem,
        blocks,
        head,
        input_shape,
        lambda shape: PoolHead(shape[0], num_classes),
        _init_module,
        weight_name,
    )


def _init_module(name: str, module: nn.Module) -> bool:
    """torchvision's ResNet initialisation: convolutions He-normal (fan out); norms and linear
    layers reset themselves."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        return True
    return False


def build_small_resnet(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    """A narrow ResNet of torchvision's basic blocks for small images, cheap enough for a CPU:
    a 3x3 stem to ``width`` channels, ``num_blocks`` blocks, the second half at twice the width
    and half the resolution."""
    from torchvision.models.resnet import BasicBlock

    w, T = spec.width, spec.num_blocks
    stem = nn.Sequential(
        nn.Conv2d(input_shape[0], w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
    )
    blocks, channels = [], w
    for t in range(T):
        wide = 2 * w if t >= T // 2 and T > 1 else w
        stride = 2 if wide != channels else 1
        down = None
        if stride != 1:
            down = nn.Sequential(
                nn.Conv2d(channels, wide, 1, stride, bias=False), nn.BatchNorm2d(wide)
            )
        blocks.append(BasicBlock(channels, wide, stride, down))
        channels = wide
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return assemble(
        spec,
        stem,
        blocks,
        head,
        input_shape,
        lambda shape: PoolHead(shape[0], num_classes),
        _init_module,
    )
