"""Mixed precision, activation checkpointing and compilation, from the config: what the engine
computes in and how, and the loss scaler fp16 needs."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..core import ComputeOptions

AUTOCAST = {"fp32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def compute_options(config: TrainConfig, device: torch.device) -> ComputeOptions:
    return ComputeOptions(
        autocast_dtype=AUTOCAST[config.precision],
        device_type=device.type,
        checkpoint_blocks=config.activation_checkpointing == "blocks",
        compile=config.compile_backend if config.compile == "blocks" else None,
    )


def grad_scaler(
    compute: ComputeOptions, device: torch.device, group: dist.ProcessGroup | None = None
) -> torch.amp.GradScaler | None:
    """A dynamic loss scale for fp16 (None otherwise). Every stage of a pipeline must use the
    same scale, so over a ``group`` the overflow check is shared (torch's ShardedGradScaler
    all-reduces it) and every stage grows or backs off its scale together."""
    if compute.autocast_dtype != torch.float16:
        return None
    if group is None:
        return torch.amp.GradScaler(device.type)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device.type, process_group=group)
