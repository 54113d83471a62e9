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
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's transform: with ``training`` and ``augment.enabled`` random resized crop, flip,
    auto_augment (or color jitter) and random erasing; else resize and centre crop."""
    from timm.data import create_transform

    install_posterize_fix()
    augmenting = training and augment.enabled
    interpolation = augment.interpolation
    if not augmenting and interpolation == "random":  # timm's eval transform needs one mode
        interpolation = "bicubic"
    return create_transform(
        image_size,
        is_training=augmenting,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment,
        interpolation=interpolation,
        mean=mean,
        std=std,
        re_prob=augment.re_prob,
        re_mode=augment.re_mode,
        re_count=augment.re_count,
        crop_pct=augment.crop_pct,
    )


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
