"""Model names -> builders. Config validation asks the registry; builders (and torchvision,
timm or your package) are imported only when a model is built, on the meta device.

A name is one of the built-in families below, ``timm/<model>`` (a timm Vision Transformer),
or ``package.module:function`` (your builder: ``function(spec, input_shape, num_classes)``
returning ``pipeline_model(...)``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ConfigError, ModelConfig
from .base import HEAD_MODES, BlockModel, ModelError
from .materialize import materialize

Builder = Callable[[ModelConfig, tuple[int, ...], int], BlockModel]


@dataclass(frozen=True)
class ModelEntry:
    builder: str | Builder  # a callable, or "package.module:function", imported when built
    num_blocks: int | None = None  # fixed depth T; None: the config's model.num_blocks
    depth_from_build: bool = False  # T known only once built (timm, your builders)
    checks_options: bool = False  # its builder checks its options: build it (on meta) to validate

    def resolve(self, name: str) -> Builder:
        if callable(self.builder):
            return self.builder
        module, _, function = self.builder.partition(":")
        try:
            return getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as error:
            raise ConfigError(
                f"model.name={name}: cannot import {self.builder} ({type(error).__name__}: "
                f"{error}); give package.module:function of a builder on the Python path"
            ) from None


_HERE = __package__
MODELS: dict[str, ModelEntry] = {
    "deep_linear": ModelEntry(f"{_HERE}.mlp:build_deep_linear"),
    "residual_mlp": ModelEntry(f"{_HERE}.mlp:build_residual_mlp"),
    "relu_mlp": ModelEntry(f"{_HERE}.mlp:build_relu_mlp", checks_options=True),
    "local_mixer": ModelEntry(f"{_HERE}.local_mixer:build_local_mixer", checks_options=True),
    "vit_tiny": ModelEntry(f"{_HERE}.vit:build_vit_tiny"),
    "vit_b_16": ModelEntry(f"{_HERE}.vit:build_torchvision_vit", num_blocks=12),
    "vit_l_16": ModelEntry(f"{_HERE}.vit:build_torchvision_vit", num_blocks=24),
    "resnet_small": ModelEntry(f"{_HERE}.resnet:build_small_resnet"),
    "resnet18": ModelEntry(f"{_HERE}.resnet:build_torchvision_resnet", num_blocks=8),
    "resnet50": ModelEntry(f"{_HERE}.resnet:build_torchvision_resnet", num_blocks=16),
}


def register(name: str, builder: str | Builder, num_blocks: int | None = None) -> None:
    """Make ``model.name: name`` build with ``builder(spec, input_shape, num_classes)``."""
    MODELS[name] = ModelEntry(builder, num_blocks, depth_from_build=num_blocks is None)


def entry(name: str) -> ModelEntry:
    if name in MODELS:
        return MODELS[name]
    if name.startswith("timm/"):
        return ModelEntry(f"{_HERE}.timm_vit:build_timm_vit", depth_from_build=True)
    if ":" in name:
        return ModelEntry(name, depth_from_build=True)
    raise ConfigError(
        f"model.name={name!r}: unknown model; use one of {tuple(MODELS)}, timm/<vit name> or "
        f"package.module:function"
    )


def check_model(
    spec: ModelConfig, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10
) -> int:
    """The one check of the model section; returns T, the number of blocks the model has
    (building it on the meta device where only the build knows)."""
    found = entry(spec.name)
    if spec.head not in HEAD_MODES:
        raise ConfigError(f"model.head={spec.head!r}: unknown; use one of {HEAD_MODES}")
    if spec.num_blocks < 1:
        raise ConfigError(f"model.num_blocks={spec.num_blocks}: must be >= 1")
    if spec.width < 1 or spec.hidden < 1:
        raise ConfigError("model.width/model.hidden: must be >= 1")
    if spec.lora is not None and (spec.lora.rank < 1 or not spec.lora.targets):
        raise ConfigError("model.lora: needs rank >= 1 and a list of targets, e.g. [qkv]")
    if found.depth_from_build or found.checks_options:
        return build_model(spec, input_shape, num_classes, device="meta").num_blocks
    return found.num_blocks or spec.num_blocks


def build_model(
    spec: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> BlockModel:
    """Build the model a config names for inputs of ``input_shape`` (C, H, W), on the meta
    device; unless ``device`` is ``meta``, allocate and initialise all of it there (seed:
    ``seed``, else torch's initial seed). Pipelines keep it on meta and allocate their part."""
    with torch.device("meta"):
        model = entry(spec.name).resolve(spec.name)(spec, tuple(input_shape), num_classes)
    if not isinstance(model, BlockModel):
        raise ModelError(
            f"model.name={spec.name}: the builder returned {type(model).__name__}, not a "
            f"BlockModel; build it with mpc_dist.models.pipeline_model"
        )
    if torch.device(device).type == "meta":
        return model
    return materialize(model, device, torch.initial_seed() if seed is None else seed)
