"""Small models and batches shared by the tests (float64, CPU)."""

import torch

from mpc_dist.config import ModelConfig
from mpc_dist.models import build_model

INPUT_SHAPE = (1, 8, 8)

MODELS = {
    "residual_mlp": ModelConfig(name="residual_mlp", num_blocks=6, width=16, hidden=24),
    "residual_mlp_aux": ModelConfig(
        name="residual_mlp", num_blocks=5, width=16, hidden=24, head="aux"
    ),
    "deep_linear": ModelConfig(name="deep_linear", num_blocks=5, width=12),
    "vit_tiny": ModelConfig(
        name="vit_tiny", num_blocks=4, width=16, hidden=32, num_heads=2, patch_size=4
    ),
    "resnet18_aux": ModelConfig(name="resnet18", head="aux"),
}


def make_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(MODELS[name], INPUT_SHAPE, 10).double()


def make_batch(n: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *INPUT_SHAPE, dtype=torch.float64, generator=generator)
    return x, torch.randint(0, 10, (n,), generator=generator)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def engine_grads(model, engine, x, y, num_microbatches: int = 1) -> dict[str, torch.Tensor]:
    """The gradients ``engine`` leaves on ``model`` for one minibatch of ``num_microbatches``;
    every block graph it built is freed."""
    model.zero_grad(set_to_none=True)
    for xs, ys in zip(x.chunk(num_microbatches), y.chunk(num_microbatches), strict=True):
        engine.train_microbatch(xs, ys, loss_scale=1 / num_microbatches)
    assert engine.outstanding == 0, "every block graph must be freed"
    return grads(model)


def train_one_process(model, engine, data, num_microbatches: int, lr: float = 0.01):
    """The single-process reference of the pipeline tests: Adam over ``data``'s minibatches,
    each in ``num_microbatches``; the final parameters by name."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for x, y in data:
        for xs, ys in zip(x.chunk(num_microbatches), y.chunk(num_microbatches), strict=True):
            engine.train_microbatch(xs, ys, loss_scale=1 / num_microbatches)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(model.named_parameters())
