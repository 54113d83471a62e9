"""Model names -> builders. Config validation asks the registry; builders (and torchvision) are
imported only when a model is built."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..config import ConfigError, ModelConfig
from .base import HEAD_MODES, BlockModel

Builder = Callable[[ModelConfig, tuple[int, ...], int], BlockModel]


@dataclass(frozen=True)
class ModelEntry:
    builder: str | Builder  # a callable, or "package.module:function", imported when built
    num_blocks: int | None = None  # fixed depth T; None: the config's model.num_blocks

    def resolve(self) -> Builder:
        if callable(self.builder):
            return self.builder
        module, _, name = self.builder.partition(":")
        return getattr(importlib.import_module(module), name)


_HERE = __package__
MODELS: dict[str, ModelEntry] = {
    "deep_linear": ModelEntry(f"{_HERE}.mlp:build_deep_linear"),
    "residual_mlp": ModelEntry(f"{_HERE}.mlp:build_residual_mlp"),
    "vit_tiny": ModelEntry(f"{_HERE}.vit:build_vit_tiny"),
    "vit_b_16": ModelEntry(f"{_HERE}.vit:build_torchvision_vit", num_blocks=12),
    "vit_l_16": ModelEntry(f"{_HERE}.vit:build_torchvision_vit", num_blocks=24),
    "resnet18": ModelEntry(f"{_HERE}.resnet:build_torchvision_resnet", num_blocks=8),
    "resnet50": ModelEntry(f"{_HERE}.resnet:build_torchvision_resnet", num_blocks=16),
}


def register(name: str, builder: str | Builder, num_blocks: int | None = None) -> None:
    """Make ``model.name: name`` build with ``builder(spec, input_shape, num_classes)``."""
    MODELS[name] = ModelEntry(builder, num_blocks)


def check_model(spec: ModelConfig) -> int:
    """The one check of the model section; returns T, the number of blocks the model has."""
    if spec.name not in MODELS:
        raise ConfigError(f"model.name={spec.name!r}: unknown model; use one of {tuple(MODELS)}")
    if spec.head not in HEAD_MODES:
        raise ConfigError(f"model.head={spec.head!r}: unknown; use one of {HEAD_MODES}")
    if spec.num_blocks < 1:
        raise ConfigError(f"model.num_blocks={spec.num_blocks}: must be >= 1")
    if spec.width < 1 or spec.hidden < 1:
        raise ConfigError("model.width/model.hidden: must be >= 1")
    return MODELS[spec.name].num_blocks or spec.num_blocks


def build_model(spec: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> BlockModel:
    """Build the model a config names, for inputs of ``input_shape`` (C, H, W)."""
    check_model(spec)
    return MODELS[spec.name].resolve()(spec, tuple(input_shape), num_classes)
