"""One place that wires a pipeline stage: this rank's model part, its optimizer and step, the
engine of the plan's rule and the runtime. The trainer, the benchmark and the tests all build
stages here."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import Config, ModelConfig, OptimConfig, RulesConfig
from ..core import ComputeOptions, EngineOptions, Plan
from ..models import BlockModel, instantiate
from ..parallel import (
    Groups,
    PipelineRuntime,
    RuntimeOptions,
    ScheduleSpec,
    all_reduce_gradients,
)
from ..parallel.fsdp import reduce_gradients, shard_stage
from ..rules import make_engine
from .callbacks import Callback
from .precision import pipeline_grad_scaler
from .step import OptimizerStep, build_optimizer


def schedule_spec(config: Config) -> ScheduleSpec:
    """The schedule a config asks for."""
    p = config.pipeline
    return ScheduleSpec(config.data.num_microbatches, p.mode, p.schedule, p.defer_weights)


@dataclass
class Stage:
    model: BlockModel  # this rank's part of the model (its blocks and the heads it needs)
    optimizer: torch.optim.Optimizer
    runtime: PipelineRuntime


def build_stage(
    *,
    model: BlockModel,
    plan: Plan,
    ranges: list[tuple[int, int]],
    groups: Groups,
    optim: OptimConfig,
    runtime: RuntimeOptions,
    compute: ComputeOptions | None = None,
    seed: int = 0,
    spec: ModelConfig | None = None,
    sharding: str = "none",
    callbacks: Sequence[Callback] = (),
    fsdp_param_dtype: torch.dtype | None = None,
    rules: RulesConfig | None = None,
) -> Stage:
    """The stage ``groups.topology`` holds, of ``model`` cut at ``ranges``. A model built on the
    meta device is allocated here, this part only (``spec``: its weights file and LoRA), and
    initialised from ``seed``. ``sharding``: ``fsdp`` shards the part over its data-parallel
    replicas (FSDP2); otherwise replicas hold whole copies and sum their gradients before the
    step; ``fsdp_param_dtype``: the dtype FSDP gathers parameters in (None: theirs).
    ``compute``: mixed precision and activation checkpointing; ``rules``: the options of the
    rules beyond the horizon (``config.rules``)."""
    compute = compute or ComputeOptions()
    first, last = ranges[groups.topology.stage]
    device, dtype = runtime.device, runtime.dtype
    head_copy = plan.reads_shared_head_below_top(model.head_mode)
    weights, lora = (spec.weights, spec.lora) if spec is not None else (None, None)
    part = instantiate(model.split(first, last, head_copy), device, dtype, seed, weights, lora)
    reduce = None
    if groups.data_parallel is not None and sharding == "fsdp":
        shard_stage(part, groups.data_parallel, device, fsdp_param_dtype)
        reduce = functools.partial(reduce_gradients, part)
    optimizer = build_optimizer(optim, part.owned_parameters())
    if groups.data_parallel is not None and sharding != "fsdp":
        trained = [p for p in part.owned_parameters() if p.requires_grad]
        reduce = functools.partial(all_reduce_gradients, trained, groups.data_parallel)
    norm_group = groups.pipeline if runtime.schedule.mode == "sync" else None
    step = OptimizerStep(
        optimizer,
        optim.grad_clip,
        reduce_gradients=reduce,
        norm_group=norm_group,
        callbacks=callbacks,
        device=device,
        scaler=pipeline_grad_scaler(compute, device, groups, runtime.schedule.mode, sharding),
        on_nonfinite=optim.on_nonfinite,
        replica_group=groups.data_parallel,
    )
    options = EngineOptions(compute, scale_loss=step.scale_loss, seed=seed, rules=rules)
    engine = make_engine(part, plan, options)
    return Stage(part, optimizer, PipelineRuntime(engine, ranges, groups, step, runtime))
