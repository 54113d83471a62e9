"""Mixed precision, activation checkpointing and compilation, from the config: what the engine
computes in and how, the loss scaler fp16 needs and the ranks that share its scale, and TF32 for
fp32 on CUDA."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..core import ComputeOptions
from ..parallel import Groups

AUTOCAST = {"fp32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
FSDP_PARAM_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # pipeline.fsdp_param_dtype


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
    """A dynamic loss scale for fp16 (None otherwise). Every rank of ``group`` must use the
    same scale, so over a ``group`` the overflow check is shared (torch's ShardedGradScaler
    all-reduces it) and every rank grows or backs off its scale together."""
    if compute.autocast_dtype != torch.float16:
        return None
    if group is None:
        return torch.amp.GradScaler(device.type)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device.type, process_group=group)


def loss_scale_group(groups: Groups, mode: str, sharding: str) -> dist.ProcessGroup | None:
    """The ranks that must agree about an fp16 overflow (None: this rank alone).

    Unsharded replicas sum their gradients before unscaling them, so they see the same values:
    the pipeline's stages share the check (sync mode; async fp16 pipelines are refused by
    validation). FSDP replicas unscale different shards of the gradients, so one may see an
    overflow the others do not: the check spans the stages and the replicas. With several stages
    that is the whole job (WORLD: P x D ranks, a sync pipeline), with one stage the stage's
    data-parallel group (sync or async: one stage steps alone either way). (torch 2.6 and later
    also reduce the check over an FSDP gradient's mesh when they unscale DTensors; the group
    here does not rely on that, and adds the stages.)"""
    topology = groups.topology
    if sharding != "fsdp" or groups.data_parallel is None:
        return groups.pipeline if mode == "sync" else None
    if topology.stages == 1:
        return groups.data_parallel
    if mode != "sync":  # only fp16 would need it, and fp16 async pipelines are refused
        return None
    world = dist.get_world_size()
    if world != topology.stages * topology.replicas:
        raise RuntimeError(
            f"the job has {world} ranks, the pipeline {topology.stages} x {topology.replicas}: "
            f"the fp16 loss scale of sharded replicas is shared over the whole job"
        )
    return dist.group.WORLD


def pipeline_grad_scaler(
    compute: ComputeOptions, device: torch.device, groups: Groups, mode: str, sharding: str
) -> torch.amp.GradScaler | None:
    """The fp16 loss scale of a pipeline stage (None without fp16), shared over
    ``loss_scale_group``."""
    if compute.autocast_dtype != torch.float16:
        return None
    if mode != "sync" and groups.topology.stages > 1:
        raise ValueError("fp16 needs one loss scale for every stage: use a sync pipeline")
    return grad_scaler(compute, device, loss_scale_group(groups, mode, sharding))


def configure_tf32(enabled: bool, device: torch.device) -> bool:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (``train.tf32``, on by
    default): torch's "high" matmul precision (Ampere and later GPUs: 10-bit mantissa products,
    fp32 accumulation). ``enabled=False`` asks for full fp32
    ("highest", cuDNN's TF32 off). Process-wide: call it once at start, before any CUDA work.
    Nothing changes on the CPU. Returns whether TF32 is on."""
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled
