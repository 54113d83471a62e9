"""``Loader``: one process's minibatches of a source, the same wherever it runs.

Which samples form a minibatch, and how sample i is augmented in epoch e, depend only on
(seed, epoch, i): a batch plan in the main process names each minibatch's samples (this replica's
equal part of it, as ``minibatches`` cuts it), each item carries (epoch, i), and the decoding
worker seeds Python's, numpy's and torch's generators from (seed, epoch, i) before timm's
transform. So 0 or 4 workers give the same tensors, and a run resumed at batch k decodes nothing
before k. Mixup is seeded per global microbatch (``MicrobatchMixup``). WebDataset shards are read
in the main process in a seeded order (``ShardPlan``), their undecoded bytes go to the workers.
In-memory sets without augmentation skip all of it: they are ``minibatches`` exactly.
"""

from __future__ import annotations

import io
import tarfile
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import AugmentConfig, DataConfig
from .augment import (
    ImageTransform,
    MicrobatchMixup,
    build_transform,
    kept_generators,
    mixes,
    normalization,
    seed_all,
    seed_of,
)
from .batches import WHOLE, Shard, batch_rows, count_batches, epoch_order, minibatches
from .errors import DataError
from .plans import ShardPlan
from .sources import FileSource, MemorySource, ShardSource, split_name

# What a corrupt or truncated image raises in PIL (and the readers under it).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, tarfile.TarError)
Batch = tuple[torch.Tensor | None, torch.Tensor | None]
Item = tuple[np.ndarray | None, int, str | None, int]  # pixels, target, error, the image's seed


class Items(torch.utils.data.Dataset):
    """Decodes and transforms one item: (epoch, i) of a random-access source, or (epoch, i, name,
    bytes, target) of a shard stream, to its pixels after timm's per-image ops (``Item``); the
    batch is finished in ``Collate``. A sample that cannot be decoded gives (None, target,
    "file: reason", seed) rather than raising, so the trainer decides."""

    def __init__(self, source: Any, transform: ImageTransform, seed: int, mode: str | None) -> None:
        self.source, self.transform, self.seed, self.mode = source, transform, seed, mode

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple) -> Item:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple]) -> list[Item]:
        """A batch's items (the DataLoader asks for them together). In a worker process the
        generators are its own; in the trainer's their states come back once per batch."""
        with kept_generators(torch.utils.data.get_worker_info() is None):
            return [self._one(item) for item in items]

    def _one(self, item: tuple) -> Item:
        epoch, index = item[0], item[1]
        name, target = (item[2], item[4]) if len(item) > 2 else (None, -1)
        seed = seed_of(self.seed, epoch, index)
        try:
            if len(item) > 2:
                image = _decode(io.BytesIO(item[3]), self.mode)
            else:
                raw, target, name = self.source.read(index)
                image = raw if isinstance(raw, Image.Image) else _decode(raw, self.mode)
            seed_all(seed)
            return self.transform.image(image), target, None, seed
        except DECODE_ERRORS as exc:
            return None, target, f"{name}: {type(exc).__name__}: {exc}".replace("\n", " "), seed


def _decode(fileobj: Any, mode: str | None) -> Image.Image:
    with fileobj:
        image = Image.open(fileobj)
        image.load()  # decode now, inside the error handling, not lazily in the transform
    return image.convert(mode) if mode and image.mode != mode else image


class Collate:
    """A batch of ``Item``: the images finished by ``transform.batch`` (in a worker, straight
    into shared memory: no copy on the way out). A row that failed to decode takes the next
    good row's item (cyclically), so the batch keeps its size and no image is paired with
    another's label."""

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def __call__(self, items: list[Item]) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
        good = [k for k, item in enumerate(items) if item[0] is not None]
        errors = [item[2] for item in items if item[2] is not None]
        if not good:
            return None, torch.zeros(0, dtype=torch.int64), errors
        rows = [
            item if item[0] is not None else items[min((g for g in good if g > k), default=good[0])]
            for k, item in enumerate(items)
        ]
        in_worker = torch.utils.data.get_worker_info() is not None
        with kept_generators(not in_worker and self.transform.erasing is not None):
            images = self.transform.batch([r[0] for r in rows], [r[3] for r in rows], in_worker)
        targets = torch.tensor([int(r[1]) for r in rows], dtype=torch.int64)
        return images, targets, errors


class BatchPlan(torch.utils.data.Sampler):
    """Random access: minibatch b of an epoch is rows [b B, (b + 1) B) of the (seed, epoch)
    order and this replica takes its ``tensor_split`` part; items are (epoch, i)."""

    def __init__(
        self, size: int, batch_size: int, seed: int, shuffle: bool, drop_last: bool, shard: Shard
    ) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.shuffle, self.shard = shuffle, shard
        self.total = count_batches(size, batch_size, drop_last)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.total - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.size, self.seed, self.epoch, self.shuffle)
        for b in range(self.start_batch, self.total):
            yield [(self.epoch, int(i)) for i in batch_rows(order, b, self.batch_size, self.shard)]


class Loader:
    """One process's minibatches of ``source`` for ``split``: ``epoch(e, start_batch)`` yields
    (inputs, targets) per minibatch, this replica's rows. Targets are int64 (N,), or float32
    (N, C) with mixup, cutmix or label smoothing. Where ``shard.inputs`` is False (a pipeline
    stage after the first) no image file is opened: in-memory sets without mixing yield
    (None, targets) as ``minibatches`` does, every other source (None, None) per minibatch
    (the targets travel from the first stage)."""

    def __init__(
        self,
        source: MemorySource | FileSource | ShardSource,
        data: DataConfig,
        augment: AugmentConfig,
        split: str,
        seed: int,
        shard: Shard = WHOLE,
        num_microbatches: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.source, self.data, self.seed, self.shard = source, data, seed, shard
        self.training = split_name(split) == "train"
        self.batch_size = data.batch_size if self.training else data.eval_batch_size
        self.num_microbatches = num_microbatches if self.training else 1
        self.device = torch.device(device)
        self.mixup = (
            MicrobatchMixup(augment, source.num_classes)
            if (self.training and mixes(augment))
            else None
        )
        self.images = _uses_images(source, augment, self.training)
        self.plan = self._plan()
        self.batches_per_epoch = self.plan.total
        self.transform: ImageTransform | None = None
        if self.images:
            mean, std = normalization(augment, (source.mean, source.std))
            self.transform = build_transform(augment, source.image_size, self.training, mean, std)
        self._loader: torch.utils.data.DataLoader | None = None
        self.last_wait_s = 0.0
        self._wait_s, self._batches, self._skipped = 0.0, 0, 0
        self._skipped_files: list[str] = []

    def _plan(self) -> BatchPlan | ShardPlan:
        shuffle, drop_last = self.data.shuffle and self.training, self.training
        if isinstance(self.source, ShardSource):
            return ShardPlan(
                self.source,
                self.batch_size,
                self.seed,
                shuffle,
                self.training,
                self.shard,
                self.data.shuffle_buffer,
                self.data.on_error,
            )
        return BatchPlan(
            len(self.source), self.batch_size, self.seed, shuffle, drop_last, self.shard
        )

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This process's minibatches of ``epoch`` from ``start_batch`` on."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch}: must be in [0, {self.batches_per_epoch}]")
        if not self.shard.inputs:
            yield from self._without_inputs(epoch, start_batch)
        elif not self.images:
            yield from self._timed(self._tensors(epoch, start_batch))
        else:
            yield from self._timed(self._decoded(epoch, start_batch))

    def _without_inputs(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        if isinstance(self.source, MemorySource) and self.mixup is None and not self.images:
            yield from self._tensors(epoch, start_batch)
            return
        for _ in range(start_batch, self.batches_per_epoch):
            yield None, None

    def _tensors(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        """An in-memory set as it is held: ``minibatches`` (then mixup, if on)."""
        batches = minibatches(
            self.source.dataset,
            self.batch_size,
            self.seed,
            epoch,
            self.data.shuffle and self.training,
            self.training,
            start_batch,
            self.shard,
        )
        for b, (inputs, targets) in enumerate(batches, start_batch):
            if self.mixup is not None and inputs is not None:
                inputs, targets = self._mix(inputs, targets, epoch, b)
            yield inputs, targets

    def _decoded(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        self.plan.epoch, self.plan.start_batch = epoch, start_batch
        for b, (inputs, targets, errors) in enumerate(self._data_loader(), start_batch):
            self._handle(errors)
            if inputs is None:
                reason = errors[0] if errors else "none left: a shard was cut short"
                raise DataError(
                    f"data.root={self.data.root}: no image of batch {b} could be read "
                    f"({reason}); replace the files"
                )
            if self.mixup is not None:
                inputs, targets = self._mix(inputs, targets, epoch, b)
            yield inputs, targets

    def _mix(self, inputs: torch.Tensor, targets: torch.Tensor, epoch: int, batch: int) -> Batch:
        m = self.num_microbatches
        first = self.shard.index * m  # this replica's first microbatch in the global count
        return self.mixup(inputs, targets, (self.seed, epoch, batch), first, m)

    def _handle(self, errors: list[str]) -> None:
        if not errors:
            return
        if self.data.on_error != "skip":
            raise DataError(f"{errors[0]}; replace or remove the file (or set data.on_error=skip)")
        self._skipped += len(errors)
        self._skipped_files.extend(errors[: max(0, 20 - len(self._skipped_files))])

    def _timed(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Move each batch to the device and record how long the consumer waited for it."""
        non_blocking = self.device.type == "cuda"
        while True:
            start = time.perf_counter()
            try:
                inputs, targets = next(batches)
            except StopIteration:
                return
            if inputs is not None:
                inputs = inputs.to(self.device, non_blocking=non_blocking)
            targets = targets.to(self.device, non_blocking=non_blocking)
            self.last_wait_s = time.perf_counter() - start
            self._wait_s += self.last_wait_s
            self._batches += 1
            yield inputs, targets

    def _data_loader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            workers = self.data.num_workers
            mode = None if isinstance(self.source, MemorySource) else "RGB"
            self._loader = torch.utils.data.DataLoader(
                Items(self.source, self.transform, self.seed, mode),
                batch_sampler=self.plan,
                num_workers=workers,
                collate_fn=Collate(self.transform),
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
                prefetch_factor=self.data.prefetch_factor if workers > 0 else None,
                # its own generator: the workers' base seed is not drawn from the trainer's
                generator=torch.Generator().manual_seed(self.seed),
            )
        return self._loader

    def stats(self) -> dict[str, Any]:
        """Totals so far: wait_s (the consumer's wait for batches), batches, skipped (images
        and shard samples that could not be read, with data.on_error=skip) and the first
        skipped_files."""
        skipped = self._skipped + getattr(self.plan, "skipped", 0)
        files = self._skipped_files + getattr(self.plan, "skipped_files", [])
        return {
            "wait_s": self._wait_s,
            "batches": self._batches,
            "skipped": skipped,
            "skipped_files": files[:20],
        }


def _uses_images(source: Any, augment: AugmentConfig, training: bool) -> bool:
    """Disk sources always; an in-memory set of images when augmenting its training split or
    resizing (its evaluation split at its own size stays the plain tensors)."""
    if not isinstance(source, MemorySource):
        return True
    resized = source.image_size != source.native_size
    wanted = resized or (training and augment.enabled)
    if wanted and source.dataset.images is None:
        raise DataError(
            f"data.dataset={source.name}: holds no images to augment or resize; set "
            "augment.enabled=false and data.image_size=null"
        )
    return wanted
