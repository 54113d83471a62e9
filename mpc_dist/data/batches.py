"""Which samples form each minibatch: a function of (seed, epoch) only, and what one process
(a data-parallel replica, a pipeline stage) reads of it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .memory import Dataset


@dataclass(frozen=True)
class Shard:
    """What one process reads of every minibatch: the rows of its data-parallel replica (``index``
    of ``count`` equal parts) and the inputs only if it uses them (a pipeline's first stage)."""

    index: int = 0
    count: int = 1
    inputs: bool = True


WHOLE = Shard()  # every row of every batch, inputs included


def count_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch of ``n`` samples; with drop_last a final partial batch is not counted."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be positive")
    return n // batch_size if drop_last else -(-n // batch_size)


def num_batches(dataset: Dataset, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches per epoch; with drop_last a final partial batch is not counted."""
    return count_batches(len(dataset), batch_size, drop_last)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The epoch's sample order: a permutation drawn from (seed, epoch) alone, never from global
    RNG state, so every rank computes the same one."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_rows(order: torch.Tensor, batch: int, batch_size: int, shard: Shard) -> torch.Tensor:
    """Sample indices of minibatch ``batch`` that ``shard``'s replica reads: its part of the
    minibatch in equal parts (of a last partial batch: nearly equal)."""
    rows = order[batch * batch_size : (batch + 1) * batch_size]
    return rows.tensor_split(shard.count)[shard.index]


def minibatches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    start_batch: int = 0,
    shard: Shard = WHOLE,
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
    """Yield (inputs, targets) batches of one epoch, starting at batch `start_batch`.

    The order is a function of (seed, epoch) only, never of global RNG state or of start_batch,
    so every rank computes the same order and a run resumed mid-epoch sees the same later batches.
    With a ``shard``, only that replica's rows (and inputs only where asked) are read.
    """
    total = num_batches(dataset, batch_size, drop_last)
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch}: must be >= 0")
    order = epoch_order(len(dataset), seed, epoch, shuffle)
    for b in range(start_batch, total):
        idx = batch_rows(order, b, batch_size, shard)
        yield (dataset.inputs[idx] if shard.inputs else None), dataset.targets[idx]
