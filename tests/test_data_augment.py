"""timm's augmentation as the recipes use it: RandAugment's posterize made safe with Pillow 13,
and mixup / cutmix / label smoothing per microbatch."""

from __future__ import annotations

import random

import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageOps

from mpc_dist.config import AugmentConfig
from mpc_dist.data import MicrobatchMixup, build_transform, safe_posterize
from mpc_dist.data.augment import IMAGENET_MEAN, IMAGENET_STD, seeded


def test_randaugment_draws_every_magnitude_without_failing() -> None:
    """DeiT's rand-m9-mstd0.5-inc1 draws magnitude ~ N(9, 0.5) per op; at 10 and above the
    increasing posterize asks for 0 bits, which Pillow >= 13 refuses. Thousands of images go
    through the transform, the 0-bit case is met many times, and nothing fails."""
    augment = AugmentConfig(enabled=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    transform = build_transform(augment, 16, True, IMAGENET_MEAN, IMAGENET_STD)
    rand_augment = next(t for t in transform.image.transforms if type(t).__name__ == "RandAugment")
    bits_asked = []
    for op in rand_augment.ops:
        if op.name.startswith("Posterize"):
            assert op.aug_fn is safe_posterize
            op.aug_fn = lambda img, bits, **kw: bits_asked.append(bits) or safe_posterize(img, bits)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), np.uint8))
    with seeded(0):
        for _ in range(3000):
            assert transform(image).shape == (3, 16, 16)
    assert bits_asked.count(0) >= 3 and max(bits_asked) >= 1  # the failing case, met (5 times)


def test_zero_bit_posterize_is_what_pillow_12_returned() -> None:
    image = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    assert np.asarray(safe_posterize(image, 0)).max() == 0
    assert np.array_equal(
        np.asarray(safe_posterize(image, 3)), np.asarray(ImageOps.posterize(image, 3))
    )
    if int(PIL.__version__.split(".")[0]) >= 13:  # what the fix is for
        with pytest.raises(ValueError, match="bits must be between"):
            ImageOps.posterize(image, 0)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_soft_targets_are_seeded_per_microbatch(mode: str) -> None:
    augment = AugmentConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1, mixup_mode=mode)
    mix = MicrobatchMixup(augment, num_classes=5)
    inputs, targets = torch.randn(8, 3, 6, 6), torch.arange(8) % 5
    x1, t1 = mix(inputs.clone(), targets, (0, 1, 2), 0, 2)
    x2, t2 = mix(inputs.clone(), targets, (0, 1, 2), 0, 2)
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and t1.dtype == torch.float32
    assert t1.shape == (8, 5)
    torch.testing.assert_close(t1.sum(1), torch.ones(8))
    x3, t3 = mix(inputs.clone(), targets, (0, 1, 3), 0, 2)  # another batch: other draws
    assert not torch.equal(t1, t3)
    # The second microbatch numbered 1 alone equals the second of the pair numbered from 0.
    x4, t4 = mix(inputs[4:].clone(), targets[4:], (0, 1, 2), 1, 1)
    assert torch.equal(x4, x1[4:]) and torch.equal(t4, t1[4:])


def test_label_smoothing_alone_draws_nothing() -> None:
    mix = MicrobatchMixup(AugmentConfig(label_smoothing=0.1), num_classes=4)
    inputs = torch.randn(4, 1, 2, 2)
    state = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    x, t = mix(inputs.clone(), torch.tensor([0, 1, 2, 3]), (0, 0, 0), 0, 2)
    assert torch.equal(x, inputs)
    torch.testing.assert_close(t, torch.eye(4) * 0.9 + 0.025)
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])


@pytest.mark.parametrize("training", [True, False])
def test_transform_is_timms_own_to_the_bit(training: bool) -> None:
    """The per-image PIL ops, then conversion and normalization per batch, give exactly what
    timm's per-image transform (``create_transform``, no prefetcher) gives under the same seed."""
    from timm.data import create_transform

    augment = AugmentConfig(enabled=True, auto_augment="rand-m9-mstd0.5-inc1")
    ours = build_transform(augment, 16, training, IMAGENET_MEAN, IMAGENET_STD)
    timms = create_transform(
        16,
        is_training=training,
        auto_augment=augment.auto_augment,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=augment.crop_pct,
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)) for _ in range(6)]
    expected, arrays = [], []
    for k, image in enumerate(images):
        with seeded(k):
            expected.append(timms(image))
        with seeded(k):
            arrays.append(ours.image(image))
    assert torch.equal(ours.batch(arrays, list(range(6))), torch.stack(expected))
    to_tensor, normalize = timms.transforms[-2:]  # large rows: normalized a row at a time
    large = [rng.integers(0, 256, (300, 300, 3), np.uint8) for _ in range(2)]
    expected = [normalize(to_tensor(Image.fromarray(a))) for a in large]
    assert torch.equal(ours.batch(large, [0, 1], shared=True), torch.stack(expected))


def test_random_erasing_is_seeded_per_image() -> None:
    augment = AugmentConfig(enabled=True, re_prob=1.0)
    transform = build_transform(augment, 16, True, IMAGENET_MEAN, IMAGENET_STD)
    arrays = [np.full((16, 16, 3), 128, np.uint8)] * 3
    batch = transform.batch(arrays, [5, 6, 5])
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    assert torch.equal(transform.batch(arrays[:1], [6])[0], batch[1])  # not the row's place
    plain = build_transform(AugmentConfig(enabled=True), 16, True, IMAGENET_MEAN, IMAGENET_STD)
    assert (batch != plain.batch(arrays, [5, 6, 5])).any(dim=(1, 2, 3)).all()  # erased, each
