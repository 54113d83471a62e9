"""Pipeline-ready models: the BlockModel protocol and ``pipeline_model`` for your own modules,
one module per family, the registry, and the meta-device build with layout-independent
initialisation, pretrained weights and LoRA."""

from .base import HEAD_MODES, BlockModel, ModelError, assemble, pipeline_model
from .materialize import add_lora, instantiate, is_meta, load_weights, materialize
from .registry import MODELS, ModelEntry, build_model, check_model, register

__all__ = [
    "HEAD_MODES",
    "MODELS",
    "BlockModel",
    "ModelEntry",
    "ModelError",
    "add_lora",
    "assemble",
    "build_model",
    "check_model",
    "instantiate",
    "is_meta",
    "load_weights",
    "materialize",
    "pipeline_model",
    "register",
]
