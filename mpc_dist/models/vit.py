"""Vision transformers from torchvision: patch embedding + tokens as the stem, encoder layers as
the blocks, the class token's norm + linear as the head."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import BlockModel, ModelError, assemble


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


def build_vit_tiny(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    """A small ViT sized by the config (``num_blocks``, ``width``, ``hidden``, ``num_heads``)."""
    from torchvision.models import vision_transformer as tv

    height = spec.image_size or input_shape[1]
    if height % spec.patch_size:
        raise ModelError(f"model.patch_size={spec.patch_size}: must divide the image size {height}")
    vit = tv.VisionTransformer(
        image_size=height,
        patch_size=spec.patch_size,
        num_layers=spec.num_blocks,
        num_heads=spec.num_heads,
        hidden_dim=spec.width,
        mlp_dim=spec.hidden,
        num_classes=num_classes,
    )
    return _from_torchvision(spec, vit, input_shape, num_classes)


def build_torchvision_vit(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    """``vit_b_16`` / ``vit_l_16`` at the input's size rounded to whole 16-pixel patches."""
    from torchvision.models import vision_transformer as tv

    image_size = spec.image_size or max(16, round(input_shape[1] / 16) * 16)
    vit = getattr(tv, spec.name)(weights=None, image_size=image_size, num_classes=num_classes)
    return _from_torchvision(spec, vit, input_shape, num_classes)


def _from_torchvision(spec: ModelConfig, vit: nn.Module, input_shape, num_classes) -> BlockModel:
    stem = ViTStem(vit, input_shape[0])
    head = ClassTokenHead(vit.encoder.ln, vit.heads)
    hidden = vit.hidden_dim

    def make_aux(shape: tuple[int, ...]) -> nn.Module:
        return ClassTokenHead(nn.LayerNorm(hidden), nn.Linear(hidden, num_classes))

    blocks = list(vit.encoder.layers)
    return assemble(spec, stem, blocks, head, input_shape, make_aux, _init_module, _weight_name)


def _init_module(name: str, module: nn.Module) -> bool:
    """torchvision's VisionTransformer initialisation, one module at a time."""
    from torchvision.models.vision_transformer import MLPBlock

    if isinstance(module, ViTStem):
        conv = module.conv_proj
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(conv.bias)
        nn.init.zeros_(module.class_token)
        nn.init.normal_(module.pos_embedding, std=0.02)
        return True
    if isinstance(module, MLPBlock):
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.normal_(layer.bias, std=1e-6)
        return True
    if name == "head":  # the classifier starts at zero
        for layer in module.linear.modules():
            if isinstance(layer, nn.Linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        return True  # its norm, a child, was reset before
    return False


_TV_VIT = [
    (r"conv_proj\.(.*)", r"stem.conv_proj.\1"),
    (r"class_token", r"stem.class_token"),
    (r"encoder\.pos_embedding", r"stem.pos_embedding"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.(.*)", r"blocks.\1.\2"),
    (r"encoder\.ln\.(.*)", r"head.norm.\1"),
    (r"heads\.(.*)", r"head.linear.\1"),
]


def _weight_name(key: str) -> str | None:
    """torchvision's names (``encoder.layers.encoder_layer_3.mlp.0.weight``) to ours."""
    for pattern, replacement in _TV_VIT:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return key
