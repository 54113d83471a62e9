"""Devices and dtypes by their config names: the one place ``train.device`` and ``train.dtype``
become torch objects."""

from __future__ import annotations

import torch

from .config import ConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def dtype_of(name: str) -> torch.dtype:
    """``train.dtype``'s torch dtype."""
    return DTYPES[name]


def resolve_device(name: str, index: int | None = None) -> torch.device:
    """``train.device``: auto means CUDA when a GPU is visible (GPU ``index``), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is visible; use train.device=auto")
    return torch.device(name, index) if name == "cuda" and index is not None else torch.device(name)
