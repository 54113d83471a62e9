"""Devices and dtypes by their config names: the one place ``train.device`` and ``train.dtype``
become torch objects."""

from __future__ import annotations

import glob
import os

import torch

from .config import ConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def dtype_of(name: str) -> torch.dtype:
    """``train.dtype``'s torch dtype."""
    return DTYPES[name]


def nvidia_gpus() -> int:
    """NVIDIA GPUs this process could see, whether or not torch can use them: the driver's
    device files, as many as CUDA_VISIBLE_DEVICES lists when it is set (launchers such as
    DeepSpeed's set it on machines without GPUs too)."""
    present = len(glob.glob("/dev/nvidia[0-9]*"))
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return present
    return min(present, len([d for d in listed.split(",") if d.strip() and d.strip() != "-1"]))


def resolve_device(name: str, index: int | None = None) -> torch.device:
    """``train.device``: auto means CUDA when a GPU is visible (GPU ``index``), else CPU. GPUs
    that torch cannot use (a wheel built for another CUDA, a driver too old) are an error, not
    a silent CPU run."""
    if name == "auto":
        if not torch.cuda.is_available() and nvidia_gpus():
            raise ConfigError(
                f"train.device=auto: {nvidia_gpus()} NVIDIA GPU(s) present but torch "
                f"{torch.__version__} (CUDA {torch.version.cuda}) cannot use them; install a "
                f"torch build for this driver, or set train.device=cpu to train on the CPU"
            )
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is visible; use train.device=auto")
    return torch.device(name, index) if name == "cuda" and index is not None else torch.device(name)
