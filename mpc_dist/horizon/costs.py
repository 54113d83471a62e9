"""Measured per-block costs: forward (F), input gradient (B) and weight gradient (W) of one block
on this machine, with the same B/W split the runtime uses when it defers weight gradients. The
horizon selection feeds them to the pipeline simulator (time per step against h), and so do
``mpc-dist simulate --model`` and the bench's real-compute mode."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ..config import ModelConfig
from ..core.deferral import input_backward
from ..models import BlockModel, build_model, instantiate
from ..parallel import Costs


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_block(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.nn.Parameter],
    sample: torch.Tensor,
    repeats: int = 5,
) -> Costs:
    """Median seconds of F, B and W of ``forward`` on ``sample`` (after one warm-up)."""
    device = sample.device
    times: list[tuple[float, float, float]] = []
    for _ in range(repeats + 1):
        leaf = sample.detach().requires_grad_()
        start = _clock(device)
        out = forward(leaf)
        forwarded = _clock(device)
        _, deferred = input_backward(out, torch.ones_like(out), leaf, params)
        inputs = _clock(device)
        deferred.run()
        weights = _clock(device)
        times.append((forwarded - start, inputs - forwarded, weights - inputs))
        for p in params:
            p.grad = None
    f, b, w = (statistics.median(t[k] for t in times[1:]) for k in range(3))
    return Costs(forward=f, input_grad=b, weight_grad=w)


def model_block_costs(
    spec: ModelConfig,
    input_shape: tuple[int, ...],
    batch_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
) -> Costs:
    """F, B and W of one middle block of the model ``spec`` names, at ``batch_size`` samples:
    only that block is allocated (the model is built on the meta device)."""
    model = build_model(spec, input_shape, 10, device="meta")
    t = model.num_blocks // 2
    part = instantiate(model.split(t, t + 1), device, dtype, seed=0)
    sample = torch.randn(batch_size, *model.state_shapes[t], device=device, dtype=dtype)
    params = [p for p in part.block_parameters(t) if p.requires_grad]
    return measure_block(lambda x: part.block_forward(t, x), params, sample, repeats)


def middle_block_costs(model: BlockModel, x: torch.Tensor) -> Costs:
    """F, B and W of ``model``'s middle block (allocated) on the state ``x`` reaches there."""
    middle = model.num_blocks // 2
    with torch.no_grad():
        for t in range(middle):
            x = model.block_forward(t, x)
    params = [p for p in model.block_parameters(middle) if p.requires_grad]
    return measure_block(lambda state: model.block_forward(middle, state), params, x)
