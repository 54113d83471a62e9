"""``ShardPlan``: minibatches of WebDataset shards, read in the trainer's process in an order that
is a function of (seed, epoch, shard list) alone; the workers only decode.

Training: the shard list is permuted by (seed, epoch) (kept as listed with data.shuffle=false) and
replica d reads shards d, d + D, ... of it, so replicas read disjoint shards. Its samples pass a
shuffle buffer of data.shuffle_buffer samples seeded by (seed, epoch, d), and its minibatch part is
the next B / D samples. Every replica yields as many minibatches as the one with the fewest
samples has. Evaluation: every shard in order, and each replica decodes its ``tensor_split`` part
of every minibatch (as for the in-memory sets). A resume at batch k re-reads the bytes before k
(nothing is decoded), so it continues exactly where the uninterrupted run would be.
"""

from __future__ import annotations

import random
import tarfile
from collections.abc import Iterator

import torch

from .augment import seed_of
from .batches import Shard, count_batches
from .errors import DataError
from .sources import ShardSource

Item = tuple[int, int, str, bytes, int]  # (epoch, sample index, name, image bytes, class)
READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


class ShardPlan(torch.utils.data.Sampler):
    """Batch sampler over shard streams: yields this replica's items of each minibatch."""

    def __init__(
        self,
        source: ShardSource,
        batch_size: int,
        seed: int,
        shuffle: bool,
        training: bool,
        shard: Shard,
        buffer: int,
        on_error: str,
    ) -> None:
        self.source, self.seed, self.shuffle, self.training = source, seed, shuffle, training
        self.shard, self.buffer, self.on_error = shard, buffer, on_error
        self.batch_size = batch_size
        if training:
            self.part = batch_size // shard.count
            counts = [sum(source.lengths[d :: shard.count]) for d in range(shard.count)]
            self.total = min(counts) // self.part
        else:
            self.total = count_batches(len(source), batch_size, drop_last=False)
        self.epoch, self.start_batch = 0, 0
        self.skipped, self.skipped_files = 0, []

    def __len__(self) -> int:
        return self.total - self.start_batch

    def shard_order(self, epoch: int) -> list[int]:
        """The shards this replica reads in ``epoch``, in order."""
        n = len(self.source.shards)
        if not self.training:
            return list(range(n))
        order = list(range(n))
        if self.shuffle:
            random.Random(seed_of(self.seed, epoch)).shuffle(order)
        return order[self.shard.index :: self.shard.count]

    def __iter__(self) -> Iterator[list[Item]]:
        if self.training:
            yield from self._training_batches()
        else:
            yield from self._evaluation_batches()

    def _training_batches(self) -> Iterator[list[Item]]:
        stream = self._stream(self.shard_order(self.epoch))
        if self.shuffle:
            rng = random.Random(seed_of(self.seed, self.epoch, self.shard.index))
            stream = _buffer_shuffle(stream, self.buffer, rng)
        for b in range(self.total):
            batch = [next(stream) for _ in range(self.part)]
            if b >= self.start_batch:
                yield batch

    def _evaluation_batches(self) -> Iterator[list[Item]]:
        stream = self._stream(self.shard_order(self.epoch), repeat=False)
        for b in range(self.total):
            batch = [item for _, item in zip(range(self.batch_size), stream, strict=False)]
            if b >= self.start_batch:
                rows = torch.arange(len(batch)).tensor_split(self.shard.count)[self.shard.index]
                yield [batch[int(r)] for r in rows]

    def _stream(self, shards: list[int], repeat: bool = True) -> Iterator[Item]:
        """The samples of ``shards`` in order; with ``repeat`` the list starts over when it ends
        (only short of samples where data.on_error=skip dropped part of a truncated shard)."""
        while True:
            read = 0
            for k in shards:
                for j, (key, image, target) in enumerate(self._samples(k)):
                    read += 1
                    yield self.epoch, self.source.offsets[k] + j, f"{key}", image, target
            if not repeat:
                return
            if read == 0:
                raise DataError(f"data.root: no shard of {shards} could be read; replace them")

    def _samples(self, k: int) -> Iterator[tuple[str, bytes, int]]:
        path, read = self.source.shards[k], 0
        try:
            for key, image, target in self.source.samples(k):
                read += 1
                yield f"{path}:{key}", image, target
        except READ_ERRORS as exc:
            lost = max(0, self.source.lengths[k] - read)
            if self.on_error != "skip":
                raise DataError(
                    f"{path}: shard truncated or corrupt after {read} of {self.source.lengths[k]} "
                    f"samples ({exc}); replace it (or set data.on_error=skip)"
                ) from exc
            self.skipped += lost
            if len(self.skipped_files) < 20:
                self.skipped_files.append(f"{path}: {lost} samples after {read} ({exc})")


def _buffer_shuffle(stream: Iterator[Item], size: int, rng: random.Random) -> Iterator[Item]:
    """A shuffle buffer (as WebDataset's): hold ``size`` samples, emit a random one per read."""
    held: list[Item] = []
    for item in stream:
        held.append(item)
        if len(held) >= size:
            k = rng.randrange(len(held))
            held[k], held[-1] = held[-1], held[k]
            yield held.pop()
    rng.shuffle(held)
    yield from held
