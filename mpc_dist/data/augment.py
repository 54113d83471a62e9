"""Augmentation from timm: the per-image transforms (``timm.data.create_transform``), mixup and
cutmix with label smoothing (``timm.data.Mixup``) on each microbatch, and the seeding that makes
both a function of (seed, epoch, sample) and (seed, epoch, batch, microbatch) alone.

RandAugment's posterize with Pillow >= 13: timm 1.0.31 maps the magnitude 10 of the increasing
posterize (reached by ``rand-m9-mstd0.5-inc1`` whenever the magnitude drawn with std 0.5 is at
least 10, a few percent of the draws) to 0 bits, which Pillow 13 refuses ("bits must be between
or equal to 1 and 8") where earlier Pillow returned a black image, so a long run died at random.
``install_posterize_fix`` registers a posterize that keeps 0 bits as what Pillow < 13 and the
TensorFlow reference return (every pixel 0) and calls timm's for 1 to 8 bits; docs/data.md.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from ..config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN / _STD
IMAGENET_STD = (0.229, 0.224, 0.225)
_POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")
_MASK64 = 2**64 - 1
_ERASING = 1  # random erasing's seed: seed_of(image seed, _ERASING)
_CHUNK = 1 << 18  # float32 elements normalized at a time (1 MiB)


def safe_posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits kept as Pillow < 13 kept them: every pixel 0."""
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def install_posterize_fix() -> None:
    """Make RandAugment's posterize ops call ``safe_posterize`` (ops look it up when built)."""
    from timm.data import auto_augment

    for name in _POSTERIZE_OPS:
        auto_augment.NAME_TO_OP[name] = safe_posterize


def seed_of(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys with SplitMix64's finalizer (nearby keys, unrelated
    seeds; ~2 us, where numpy's SeedSequence takes ~100 us, per decoded image)."""
    x = 0
    for key in keys:
        x = (x ^ (int(key) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x >> 1


def seed_all(seed: int) -> None:
    """Seed the three CPU generators timm's transforms and Mixup draw from. (Not
    ``torch.manual_seed``: it also queues a CUDA seeding with a stack trace, 8 ms a call.)"""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


@contextmanager
def kept_generators(keep: bool = True) -> Iterator[None]:
    """With ``keep``, Python's, numpy's and torch's CPU generator states come back after the
    block, so the trainer's own random stream is untouched by what the block draws."""
    if not keep:
        yield
        return
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


@contextmanager
def seeded(seed: int, restore: bool = True) -> Iterator[None]:
    """Run a block with the three generators seeded (and, with ``restore``, kept)."""
    with kept_generators(restore):
        seed_all(seed)
        yield


def normalization(
    augment: AugmentConfig, default: tuple[tuple[float, ...], tuple[float, ...]]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std): the config's, else the source's default."""
    mean = tuple(augment.mean) if augment.mean is not None else default[0]
    std = tuple(augment.std) if augment.std is not None else default[1]
    return mean, std


def build_transform(
    augment: AugmentConfig,
    image_size: int,
    training: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> ImageTransform:
    """timm's transform: with ``training`` and ``augment.enabled`` random resized crop, flip,
    auto_augment (or color jitter) and random erasing; else resize and centre crop. Built as
    timm builds it for its prefetcher (``use_prefetcher=True``: the PIL ops per image, the
    conversion, normalization and erasing per batch); ``ImageTransform``."""
    from timm.data import create_transform
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import MaybePILToTensor

    install_posterize_fix()
    augmenting = training and augment.enabled
    interpolation = augment.interpolation
    if not augmenting and interpolation == "random":  # timm's eval transform needs one mode
        interpolation = "bicubic"
    compose = create_transform(
        image_size,
        is_training=augmenting,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment,
        interpolation=interpolation,
        mean=mean,  # also RandAugment's fill colour
        std=std,
        crop_pct=augment.crop_pct,
        use_prefetcher=True,  # stops at the pixels: no tensor, no normalization, no erasing
    )
    if isinstance(compose.transforms[-1], MaybePILToTensor):
        compose.transforms[-1] = to_array  # the same pixels, without a tensor per image
    erasing = None
    if augmenting and augment.re_prob > 0:  # as timm's non-prefetcher transform builds it
        erasing = RandomErasing(
            augment.re_prob, mode=augment.re_mode, max_count=augment.re_count, device="cpu"
        )
    return ImageTransform(compose, mean, std, erasing)


def to_array(image: Image.Image) -> np.ndarray:
    """An image's pixels as an (H, W, C) array (C = 1 for a one-band image)."""
    pixels = np.asarray(image)
    if pixels.dtype == np.bool_:  # mode "1", as ToTensor reads it
        pixels = pixels.astype(np.uint8) * 255
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


class ImageTransform:
    """timm's per-image transform in two parts. ``image``: the PIL ops (crop, flip, RandAugment
    ...) to an (H, W, C) array, in the decoding worker under the image's seed. ``batch``: the
    arrays stacked, scaled to [0, 1] and normalized as torchvision's ``ToTensor`` and
    ``Normalize`` do it (the same float32 operations in the same order, so the same bits), in
    one vectorized pass over the batch rather than a few small tensor operations per image, then
    timm's random erasing per image, seeded from the image's own seed. ``transform(image)`` is
    both for one image."""

    def __init__(
        self,
        image: Callable[[Image.Image], np.ndarray],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        erasing: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.image, self.erasing = image, erasing
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        """One image; its erasing seeded by ``seed``, else by a draw from Python's generator
        (which continues, like the others, as if the erasing had drawn nothing)."""
        pixels = self.image(image)
        seed = random.getrandbits(63) if seed is None else seed
        with kept_generators(self.erasing is not None):
            return self.batch([pixels], [seed])[0]

    def batch(
        self, arrays: list[np.ndarray], seeds: list[int], shared: bool = False
    ) -> torch.Tensor:
        """(N, C, H, W) float32 of N images' arrays; ``seeds`` are their per-image seeds (random
        erasing reseeds the generators with each); ``shared``: in shared memory (a loader
        worker sends it so, uncopied)."""
        height, width, channels = arrays[0].shape
        out = _empty((len(arrays), channels, height, width), shared)
        # a few rows at a time, so the four passes over them stay in the cache
        rows = max(1, _CHUNK // out[0].numel())
        for start in range(0, len(arrays), rows):
            chunk = out[start : start + rows]
            pixels = torch.from_numpy(np.stack(arrays[start : start + rows]))
            chunk.copy_(pixels.permute(0, 3, 1, 2))
            if pixels.dtype == torch.uint8:  # ToTensor scales bytes only
                chunk.div_(255)
            chunk.sub_(self.mean).div_(self.std)
        if self.erasing is not None:
            for row, seed in zip(out, seeds, strict=True):
                seed_all(seed_of(seed, _ERASING))
                self.erasing(row)  # in place, on the row's view
        return out


def _empty(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """A float32 tensor; ``shared``: allocated in shared memory, as ``default_collate`` allocates
    a worker's batch (``share_memory_`` would allocate it twice and copy)."""
    if not shared:
        return torch.empty(shape, dtype=torch.float32)
    element = torch.empty(0, dtype=torch.float32)
    storage = element._typed_storage()._new_shared(math.prod(shape))
    return element.new(storage).view(shape)


def mixes(augment: AugmentConfig) -> bool:
    """True where targets become soft (N, C): mixup, cutmix or label smoothing on."""
    return augment.mixup > 0 or augment.cutmix > 0 or augment.label_smoothing > 0


class MicrobatchMixup:
    """timm's Mixup (or label smoothing alone) applied to each microbatch of a replica's share,
    seeded by (seed, epoch, batch, global microbatch index): replica d's microbatch j is global
    microbatch d * m + j, so D replicas with m microbatches each mix exactly what one process
    with m * D microbatches mixes."""

    def __init__(self, augment: AugmentConfig, num_classes: int) -> None:
        from timm.data import Mixup

        self.num_classes = num_classes
        self.label_smoothing = augment.label_smoothing
        self.mixup = None
        if augment.mixup > 0 or augment.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=augment.mixup,
                cutmix_alpha=augment.cutmix,
                prob=augment.mixup_prob,
                switch_prob=augment.switch_prob,
                mode=augment.mixup_mode,
                label_smoothing=augment.label_smoothing,
                num_classes=num_classes,
            )

    def __call__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        keys: tuple[int, int, int],
        first_microbatch: int,
        num_microbatches: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``inputs`` (in place) and return soft float32 targets (N, C). ``keys`` is
        (seed, epoch, batch); the rows are ``num_microbatches`` microbatches numbered from
        ``first_microbatch`` in the global count."""
        from timm.data.mixup import mixup_target

        soft = []
        rows = zip(inputs.chunk(num_microbatches), targets.chunk(num_microbatches), strict=True)
        for j, (x, y) in enumerate(rows):
            if self.mixup is None:  # label smoothing alone: no draw
                soft.append(mixup_target(y, self.num_classes, 1.0, self.label_smoothing))
                continue
            with seeded(seed_of(*keys, first_microbatch + j)):
                _, t = self.mixup(x, y)  # x is a view of inputs: mixed in place
            soft.append(t)
        return inputs, torch.cat(soft).float()
