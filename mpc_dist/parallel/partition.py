"""Which blocks each stage holds: uniform, balanced by parameter count or measured time, or
explicit. The partition is a list of blocks per stage; ``stage_ranges`` turns it into ranges."""

from __future__ import annotations

import copy

import torch

from ..config import PipelineConfig
from ..core import ComputeOptions
from ..core.costs import FULL_PRECISION, measure_model_block
from ..models import BlockModel, is_meta, materialize


def balanced_partition(costs: list[float], stages: int) -> list[int]:
    """Blocks per stage: contiguous groups minimizing the most expensive stage (exact DP)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: minimal max-stage cost of putting the first j blocks on k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    counts, j = [], n
    for k in range(stages, 0, -1):
        counts.append(j - cut[k][j])
        j = cut[k][j]
    return counts[::-1]


def uniform_partition(num_blocks: int, stages: int) -> list[int]:
    return [num_blocks // stages + (k < num_blocks % stages) for k in range(stages)]


def block_costs(
    model: BlockModel,
    method: str,
    sample: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    compute: ComputeOptions = FULL_PRECISION,
) -> list[float]:
    """Per-block cost: parameter count (stem with block 0, head with the last block) or time.

    Time is a block's forward, input gradient and weight gradient on the ``sample``
    microbatch (``core.costs``: median of repeats, CUDA-synchronised, under the run's autocast;
    block 0 computes no input gradient, as in training), measured on a copy of each block moved
    to ``device`` and ``dtype`` (so the model's own weights and batch-norm statistics are
    untouched, and a GPU run is profiled on the GPU).
    """
    T = model.num_blocks
    if method == "params":
        costs = [float(sum(p.numel() for p in model.block_parameters(t))) for t in range(T)]
        costs[-1] += sum(p.numel() for p in model.head.parameters())
        return costs
    costs, x = [], sample.to(device, dtype)
    for t in range(T):
        part = copy.deepcopy(model.split(t, t + 1))
        if is_meta(part):  # built on the meta device: time a freshly initialised copy
            materialize(part, device, seed=t)
        part = part.to(device, dtype)
        costs.append(measure_model_block(part, t, x, compute, input_grad=t > 0).total)
        with torch.no_grad(), compute.autocast():
            x = compute.state(part.block_forward(t, x))
        del part
    return costs


def partition(
    config: PipelineConfig,
    model: BlockModel,
    sample: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    compute: ComputeOptions = FULL_PRECISION,
) -> list[int]:
    """Blocks per stage for the method the config names (time: profiled on ``device`` in
    ``dtype`` under ``compute``'s autocast, with ``sample`` one microbatch of one replica)."""
    if config.blocks_per_stage is not None:
        return list(config.blocks_per_stage)
    if config.partition == "uniform" or config.stages == 1:
        return uniform_partition(model.num_blocks, config.stages)
    costs = block_costs(model, config.partition, sample, device, dtype, compute)
    return balanced_partition(costs, config.stages)


def stage_ranges(blocks_per_stage: list[int]) -> list[tuple[int, int]]:
    """[first, last) block range of every stage."""
    ranges, first = [], 0
    for count in blocks_per_stage:
        ranges.append((first, first + count))
        first += count
    return ranges
