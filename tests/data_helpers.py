"""Real images on disk for the data tests: a few hundred Fashion-MNIST images (MNIST where the
Debian package is not installed) exported once per test process in every format."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from mpc_dist.config import AugmentConfig, DataConfig
from mpc_dist.data import memory
from mpc_dist.data.export import export_data

# The images: Fashion-MNIST from its Debian package, else MNIST (same shape, ten classes).
DATASET = "fashion_mnist" if memory._find_idx_pair(memory._FASHION_SYSTEM_DIR, "train") else "mnist"
LIMIT = 200  # images per split, 20 per class
_ROOT = Path(tempfile.mkdtemp(prefix="mpc_dist_data_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
_WRITTEN: dict[str, Path] = {}


def exported(fmt: str) -> Path:
    """The folder holding the images in ``fmt`` (folder, tar, wds with 40-image shards, hf)."""
    if fmt not in _WRITTEN:
        export_data(DATASET, fmt, _ROOT / fmt, limit=LIMIT, shard_size=40)
        _WRITTEN[fmt] = _ROOT / fmt
    return _WRITTEN[fmt]


def copy_of(fmt: str, destination: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(exported(fmt), destination / fmt))


def data_config(fmt: str, root: Path | None = None, **fields) -> DataConfig:
    """Disk sources at 16 px, 40 images per minibatch; in-memory names as they are."""
    if fmt not in ("folder", "tar", "wds", "hf"):
        return DataConfig(**{"dataset": fmt, "batch_size": 40, **fields})
    values = dict(dataset=fmt, root=str(root or exported(fmt)), image_size=16, batch_size=40)
    return DataConfig(**{**values, **fields})


AUGMENT = AugmentConfig(enabled=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
MIXING = AugmentConfig(
    enabled=True,
    auto_augment="rand-m9-mstd0.5-inc1",
    re_prob=0.25,
    mixup=0.8,
    cutmix=1.0,
    label_smoothing=0.1,
    mixup_mode="elem",
)
