"""Third-party pipeline baselines run on 4 gloo ranks, and the 1F1B one really trains."""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.distributed as dist
from processes import run
from torch import nn

from mpc_dist.bench.baselines import (
    TORCH_SCHEDULES,
    V_SHAPED,
    BaselineResult,
    make_batch,
    run_deepspeed_pipeline,
    run_torch_pipelining,
    stage_block_ranges,
)

WORLD, WIDTH, MB, M = 4, 8, 2, 8  # DualPipeV needs m >= its 2 x WORLD stages
STEPS, WARMUP = 2, 1


def block(index: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Global block ``index``: the same weights on every rank, whoever builds it."""
    generator = torch.Generator().manual_seed(100 + index)
    linear = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(WIDTH, WIDTH, generator=generator) / WIDTH**0.5)
        linear.bias.copy_(0.1 * torch.randn(WIDTH, generator=generator))
    return nn.Sequential(linear, nn.Tanh()).to(dtype)


class Counter:
    def __init__(self) -> None:
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self):
        self.entered += 1
        yield


def check_result(result: BaselineResult, is_last: bool, counter: Counter, name: str) -> None:
    assert counter.entered == WARMUP + STEPS, name
    assert len(result.step_times) == STEPS, name
    assert all(t > 0 and math.isfinite(t) for t in result.step_times), (name, result.step_times)
    if is_last:
        assert len(result.losses) == STEPS, name
        assert all(math.isfinite(x) for x in result.losses), (name, result.losses)
    else:
        assert result.losses == [], name


def check_one_sgd_step(
    rank: int, world: int, name: str, num_blocks: int, train, dtype=torch.float64
) -> None:
    """One SGD step (lr 0.1) of baseline ``name`` equals plain single-process autograd.

    ``train(make_block, lr)`` runs the baseline for 1 step without warm-up.
    """
    exact = dtype == torch.float64
    tolerance = {"rtol": 0, "atol": 1e-12} if exact else {"rtol": 1e-5, "atol": 1e-6}
    built: dict[int, nn.Module] = {}

    def make_tracked(i: int) -> nn.Module:
        built[i] = block(i, dtype)
        return built[i]

    lr = 0.1
    result = train(make_tracked, lr)
    mine = [i for r in stage_block_ranges(name, num_blocks, world, rank) for i in r]
    assert sorted(built) == sorted(mine), name  # each rank built only its own blocks

    reference = nn.Sequential(*[block(i, dtype) for i in range(num_blocks)])
    inputs, targets = make_batch((MB, WIDTH), M, dtype)
    loss = nn.functional.mse_loss(reference(inputs), targets)
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= lr * p.grad
    for i in mine:
        expected = reference[i].state_dict()
        for key, value in built[i].state_dict().items():
            torch.testing.assert_close(value, expected[key], **tolerance, msg=name)
            assert not torch.equal(value, block(i, dtype).state_dict()[key])  # moved
    last_rank = 0 if name in V_SHAPED else world - 1
    assert len(result.step_times) == 1, name
    if rank == last_rank:
        assert len(result.losses) == 1, name
        assert math.isclose(result.losses[0], loss.item(), rel_tol=1e-12 if exact else 1e-5), name
    else:
        assert result.losses == [], name


def check_torch(rank: int, world: int) -> None:
    # Schedule1F1B: 4 blocks (one per rank). Every schedule: 8 blocks (2 per stage, or per rank).
    cases = [("Schedule1F1B", world)] + [(s, 2 * world) for s in TORCH_SCHEDULES]
    for schedule, num_blocks in cases:
        check_one_sgd_step(
            rank,
            world,
            schedule,
            num_blocks,
            lambda make, lr, s=schedule, n=num_blocks: run_torch_pipelining(
                s, make, n, (MB, WIDTH), M, steps=1, warmup=0, lr=lr
            ),
        )

    # Every schedule: 8 blocks, float32, default loss and lr, warm-up + 2 timed steps.
    for schedule in TORCH_SCHEDULES:
        counter = Counter()
        result = run_torch_pipelining(
            schedule, block, 8, (MB, WIDTH), M, STEPS, WARMUP, around_step=counter
        )
        last_rank = 0 if schedule in V_SHAPED else world - 1
        check_result(result, rank == last_rank, counter, schedule)
    dist.barrier()


def check_deepspeed(rank: int, world: int) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported
    # float32: DeepSpeed's CPU accelerator refuses to reduce float64 gradients.
    check_one_sgd_step(
        rank,
        world,
        "DeepSpeed",
        8,
        lambda make, lr: run_deepspeed_pipeline(make, 8, (MB, WIDTH), M, 1, 0, lr=lr),
        torch.float32,
    )
    counter = Counter()
    result = run_deepspeed_pipeline(block, 8, (MB, WIDTH), M, STEPS, WARMUP, around_step=counter)
    check_result(result, rank == world - 1, counter, "DeepSpeed")


def test_torch_pipelining_schedules():
    """Every torch schedule we compare with (1F1B, GPipe, interleaved, zero-bubble, DualPipeV):
    one SGD step equals single-process autograd; they time and report the loss."""
    run(check_torch, WORLD, timeout=120)


def test_deepspeed_pipeline():
    """DeepSpeed PipelineModule + train_batch: trains correctly, times, reports loss."""
    run(check_deepspeed, WORLD, timeout=180)
