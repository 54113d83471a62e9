"""ResNets from torchvision, split at residual blocks (widths change: they need aux heads)."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .base import BlockModel, assemble


class PoolHead(nn.Sequential):
    """Aux head for feature maps: global average pool + LayerNorm + Linear."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(channels),
            nn.Linear(channels, num_classes),
        )  # fmt: skip


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
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    head = nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
    return assemble(
        spec, stem, blocks, head, input_shape, lambda shape: PoolHead(shape[0], num_classes)
    )
