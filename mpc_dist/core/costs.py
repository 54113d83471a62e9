"""Measured block costs: a block's forward (F), input-gradient (B) and weight-gradient (W)
seconds on its device, with the same B/W split the runtime uses when it defers weight
gradients. The one place blocks are timed: the horizon selection, time partitioning, the bench
and ``mpc-dist simulate --model`` all measure here.

Each figure is the median of ``repeats`` runs after one warm-up, read from the host clock after
a CUDA synchronisation (on a GPU the clock would otherwise read when the kernels were queued,
not when they ran). The forward runs under the engine's ``ComputeOptions.autocast()`` and the
states between blocks are in its compute dtype, as in a mixed-precision run. Activation
checkpointing is not modelled: its recomputation is not counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..models import BlockModel, build_model, instantiate
from .deferral import input_backward
from .engine import ComputeOptions

FULL_PRECISION = ComputeOptions()


@dataclass(frozen=True)
class BlockCosts:
    """Seconds of one block on one microbatch. The fields are those of the simulator's per-block
    costs (``parallel.Costs``), which is built from them: ``Costs(**asdict(block))``."""

    forward: float
    input_grad: float
    weight_grad: float

    @property
    def total(self) -> float:
        """One training pass of the block: F + B + W."""
        return self.forward + self.input_grad + self.weight_grad


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_block(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.nn.Parameter],
    sample: torch.Tensor,
    compute: ComputeOptions = FULL_PRECISION,
    repeats: int = 5,
    input_grad: bool = True,
) -> BlockCosts:
    """Median seconds of F, B and W of ``forward`` on ``sample``. Without ``input_grad`` (the
    first block, whose input is data) B is zero and W is the whole backward to the weights."""
    device = sample.device
    times: list[tuple[float, float, float]] = []
    for _ in range(repeats + 1):
        leaf = sample.detach().requires_grad_(input_grad)
        start = _clock(device)
        with compute.autocast():
            out = forward(leaf)
        forwarded = _clock(device)
        if input_grad:
            _, deferred = input_backward(out, torch.ones_like(out), leaf, params)
            inputs = _clock(device)
            deferred.run()
        else:
            inputs = forwarded
            if params:  # a frozen block computes nothing there
                torch.autograd.backward(out, torch.ones_like(out), inputs=params)
        weights = _clock(device)
        times.append((forwarded - start, inputs - forwarded, weights - inputs))
        for p in params:
            p.grad = None
    f, b, w = (statistics.median(t[k] for t in times[1:]) for k in range(3))
    return BlockCosts(forward=f, input_grad=b, weight_grad=w)


def measure_model_block(
    model: BlockModel,
    t: int,
    state: torch.Tensor,
    compute: ComputeOptions = FULL_PRECISION,
    repeats: int = 5,
    input_grad: bool = True,
) -> BlockCosts:
    """F, B and W of block ``t`` of ``model`` (allocated; it may hold only that block) on the
    ``state`` that reaches it (in the compute dtype, as the engine hands states on)."""
    params = [p for p in model.block_parameters(t) if p.requires_grad]
    forward = lambda x: model.block_forward(t, x)
    return measure_block(forward, params, state, compute, repeats, input_grad)


def middle_block_costs(
    model: BlockModel, x: torch.Tensor, compute: ComputeOptions = FULL_PRECISION
) -> BlockCosts:
    """F, B and W of ``model``'s middle block (allocated) on the state ``x`` reaches there."""
    middle = model.num_blocks // 2
    with torch.no_grad(), compute.autocast():
        for t in range(middle):
            x = compute.state(model.block_forward(t, x))
    return measure_model_block(model, middle, compute.state(x), compute)


def model_block_costs(
    spec: ModelConfig,
    input_shape: tuple[int, ...],
    batch_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    compute: ComputeOptions = FULL_PRECISION,
) -> BlockCosts:
    """F, B and W of one middle block of the model ``spec`` names, at ``batch_size`` samples:
    only that block is allocated (the model is built on the meta device)."""
    model = build_model(spec, input_shape, 10, device="meta")
    t = model.num_blocks // 2
    part = instantiate(model.split(t, t + 1), device, dtype, seed=0)
    sample = torch.randn(batch_size, *model.state_shapes[t], device=device, dtype=dtype)
    return measure_model_block(part, t, compute.state(sample), compute, repeats)
