"""Block costs are measured in one place (``core/costs.py``): under the run's autocast, block 0
without an input gradient, leaving the measured model as it was. The figures themselves are
timings, read from the bench, not asserted here."""

import torch
from torch import nn

from mpc_dist.config import ModelConfig, PipelineConfig
from mpc_dist.core import ComputeOptions
from mpc_dist.core.costs import measure_block, middle_block_costs
from mpc_dist.models import build_model
from mpc_dist.parallel import block_costs, partition

BF16 = ComputeOptions(autocast_dtype=torch.bfloat16, device_type="cpu")


def test_the_forward_runs_under_the_runs_autocast():
    layer = nn.Linear(8, 8)
    dtypes = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = layer(x)
        dtypes.append(out.dtype)
        return out

    sample = torch.randn(4, 8)
    measure_block(forward, list(layer.parameters()), sample, BF16, repeats=2)
    measure_block(forward, list(layer.parameters()), sample, repeats=2)
    assert dtypes == [torch.bfloat16] * 3 + [torch.float32] * 3  # one warm-up, two measured
    assert all(p.grad is None for p in layer.parameters())


def test_without_an_input_gradient_the_backward_is_all_weights():
    layer = nn.Linear(8, 8)
    costs = measure_block(layer, list(layer.parameters()), torch.randn(4, 8), input_grad=False)
    assert costs.input_grad == 0.0 and costs.total == costs.forward + costs.weight_grad


def test_time_partition_and_middle_block_under_bf16_leave_the_model_alone():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="residual_mlp", num_blocks=4, width=16, hidden=24), (1, 8, 8), 10
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sample = torch.randn(4, 1, 8, 8)
    assert len(block_costs(model, "time", sample, compute=BF16)) == 4
    counts = partition(PipelineConfig(stages=2, partition="time"), model, sample, compute=BF16)
    assert sum(counts) == 4 and len(counts) == 2
    middle_block_costs(model, sample, BF16)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in model.parameters())
