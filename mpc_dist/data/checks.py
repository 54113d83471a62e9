"""What can be known about the data before any process starts: the ``data`` and ``augment``
values, and on disk the root, the split folders, empty class folders, train/val classes and the
shard list. No image is opened. Each failure is one line naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

from ..config import AugmentConfig, Config, ConfigError, DataConfig
from .errors import DataError
from .memory import DATASETS as MEMORY_DATASETS
from .memory import SHAPES
from .sources import (
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    check_folder_classes,
    disk_root,
    hf_columns,
    hf_split,
    open_shards,
    open_tar,
    require_package,
    tar_split_path,
)


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_data(config: Config) -> tuple[tuple[int, int, int], int]:
    """Check ``config.data`` and ``config.augment`` (and list what is on disk); return the input
    shape (C, H, W) and the number of classes the model must be built for."""
    d = config.data
    need(d.dataset in DATASETS, f"data.dataset={d.dataset!r}: unknown; use one of {DATASETS}")
    need(d.num_workers >= 0, f"data.num_workers={d.num_workers}: must be >= 0")
    need(d.prefetch_factor >= 1, f"data.prefetch_factor={d.prefetch_factor}: must be >= 1")
    need(d.shuffle_buffer >= 1, f"data.shuffle_buffer={d.shuffle_buffer}: must be >= 1")
    need(
        d.image_size is None or d.image_size >= 8,
        f"data.image_size={d.image_size}: at least 8 pixels, or null",
    )
    _check_augment(config.augment)
    _check_mixup_batches(config)
    if d.dataset in MEMORY_DATASETS:
        (channels, size, _), num_classes = SHAPES[d.dataset]
        resizes = d.image_size is not None and d.image_size != size
        need(
            d.dataset != "synthetic" or not (config.augment.enabled or resizes),
            "data.dataset=synthetic: not images, nothing to augment or resize; set "
            "augment.enabled=false and data.image_size=null",
        )
        side = d.image_size or size
        return (channels, side, side), num_classes
    return (3, d.image_size or DEFAULT_IMAGE_SIZE, d.image_size or DEFAULT_IMAGE_SIZE), (
        _disk_classes(d, config.pipeline.replicas)
    )


def _check_augment(a: AugmentConfig) -> None:
    need(
        len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1,
        f"augment.scale={a.scale}: two areas 0 < min <= max <= 1, e.g. [0.08, 1.0]",
    )
    need(
        len(a.ratio) == 2 and 0 < a.ratio[0] <= a.ratio[1],
        f"augment.ratio={a.ratio}: two aspect ratios 0 < min <= max, e.g. [0.75, 1.333]",
    )
    for name in ("hflip", "re_prob", "mixup_prob", "switch_prob"):
        value = getattr(a, name)
        need(0 <= value <= 1, f"augment.{name}={value}: a probability in [0, 1]")
    need(a.re_count >= 1, f"augment.re_count={a.re_count}: must be >= 1")
    need(0 < a.crop_pct <= 1, f"augment.crop_pct={a.crop_pct}: in (0, 1], e.g. 0.875")
    need(a.color_jitter >= 0, f"augment.color_jitter={a.color_jitter}: must be >= 0")
    for name in ("mean", "std"):
        value = getattr(a, name)
        need(
            value is None or len(value) in (1, 3),
            f"augment.{name}={value}: one value per channel (1 or 3), or null",
        )
    need(a.std is None or all(s > 0 for s in a.std), f"augment.std={a.std}: must be > 0")
    need(
        a.mixup >= 0 and a.cutmix >= 0,
        f"augment.mixup={a.mixup}, augment.cutmix={a.cutmix}: alphas >= 0 (0: off)",
    )
    need(
        0 <= a.label_smoothing < 1,
        f"augment.label_smoothing={a.label_smoothing}: in [0, 1), e.g. 0.1",
    )
    if a.auto_augment:
        _check_auto_augment(a.auto_augment)


def _check_auto_augment(spec: str) -> None:
    """Let timm parse the policy string (it raises on an unknown one)."""
    from timm.data.auto_augment import (
        augment_and_mix_transform,
        auto_augment_transform,
        rand_augment_transform,
    )

    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    build = (
        rand_augment_transform
        if spec.startswith("rand")
        else augment_and_mix_transform
        if spec.startswith("augmix")
        else auto_augment_transform
    )
    try:
        build(spec, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as exc:
        raise ConfigError(
            f"augment.auto_augment={spec!r}: timm cannot parse it ({exc!r}); use e.g. "
            "rand-m9-mstd0.5-inc1 (RandAugment), original (AutoAugment) or null"
        ) from exc


def _check_mixup_batches(config: Config) -> None:
    a, d = config.augment, config.data
    if not (a.mixup > 0 or a.cutmix > 0):
        return
    parts = d.num_microbatches * config.pipeline.replicas
    size = d.batch_size // parts if d.batch_size % parts == 0 else 0
    need(
        size % 2 == 0,
        f"data.batch_size={d.batch_size}: mixup pairs samples within a microbatch, so "
        f"batch_size / (num_microbatches x replicas) = {d.batch_size / parts:g} must be even; "
        f"e.g. data.batch_size={2 * parts * max(1, d.batch_size // (2 * parts))}",
    )


def _disk_classes(d: DataConfig, replicas: int) -> int:
    """The number of classes of a disk source, from listings and metadata only."""
    root = disk_root(d)
    require_package(d.dataset)
    if d.dataset == "folder":
        return len(check_folder_classes(root))
    if d.dataset == "tar":
        for split in ("train", "test"):
            tar_split_path(root, split)  # raises naming the missing split
        # indexes the tar (timm caches the index of big ones)
        return open_tar(root, "train", DEFAULT_IMAGE_SIZE).num_classes
    if d.dataset == "hf":
        train = hf_split(root, "train")
        hf_split(root, "test")
        _, label = hf_columns(train, root)
        return len(train.features[label].names)
    return _shard_classes(root, replicas)


def _shard_classes(root: Path, replicas: int) -> int:
    train = open_shards(root, "train", DEFAULT_IMAGE_SIZE)
    open_shards(root, "test", DEFAULT_IMAGE_SIZE)
    if len(train.shards) < replicas:
        raise DataError(
            f"data.root={root}: {len(train.shards)} training shards for pipeline.replicas="
            f"{replicas}; each replica reads whole shards: write at least {replicas} "
            "(mpc-dist export-data --shard-size)"
        )
    return train.num_classes


def check_num_classes(data_classes: int, model_classes: int, where: str = "model") -> None:
    """Refuse a model whose classifier has another number of classes than the data."""
    if data_classes != model_classes:
        raise DataError(
            f"{where}: the data has {data_classes} classes but the model's head has "
            f"{model_classes}; give the model {data_classes} classes (a new head when "
            "fine-tuning: model.kwargs.num_classes) or use data with its classes"
        )
