"""One place that wires a pipeline stage: this rank's model part, its optimizer and step, and
the runtime. The trainer, the benchmark and the tests all build stages here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import OptimConfig
from ..core import Plan
from ..models import BlockModel
from ..parallel import Groups, PipelineRuntime, RuntimeOptions
from .callbacks import Callback
from .precision import grad_scaler
from .step import OptimizerStep, build_optimizer


@dataclass
class Stage:
    model: BlockModel  # this rank's part of the model (its blocks and the heads it needs)
    optimizer: torch.optim.Optimizer
    runtime: PipelineRuntime


def build_stage(
    model: BlockModel,
    plan: Plan,
    ranges: list[tuple[int, int]],
    groups: Groups,
    optim: OptimConfig,
    options: RuntimeOptions,
    callbacks: Sequence[Callback] = (),
) -> Stage:
    """The stage ``groups.topology`` holds, of ``model`` cut at ``ranges``."""
    first, last = ranges[groups.topology.stage]
    head_copy = plan.reads_shared_head_below_top(model.head_mode)
    part = model.split(first, last, head_copy).to(options.device, options.dtype)
    optimizer = build_optimizer(optim, part.owned_parameters())
    norm_group = groups.pipeline if options.mode == "sync" else None
    step = OptimizerStep(
        optimizer,
        optim.grad_clip,
        data_parallel=groups.data_parallel,
        norm_group=norm_group,
        callbacks=callbacks,
        scaler=grad_scaler(options.compute, options.device, norm_group),
    )
    return Stage(part, optimizer, PipelineRuntime(part, plan, ranges, groups, step, options))
