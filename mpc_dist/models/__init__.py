"""Pipeline-ready models: the BlockModel protocol, one module per family, and the registry."""

from .base import HEAD_MODES, BlockModel, ModelError, assemble
from .registry import MODELS, ModelEntry, build_model, check_model, register

__all__ = [
    "HEAD_MODES",
    "MODELS",
    "BlockModel",
    "ModelEntry",
    "ModelError",
    "assemble",
    "build_model",
    "check_model",
    "register",
]
