"""``mpc-dist export-data``: write an in-memory image set (MNIST, Fashion-MNIST, CIFAR) to disk
as an image folder, tar files, WebDataset shards or a Hugging Face dataset, so the disk path runs
on real images offline.

Every format holds the same samples in the same order: per split, the first ``limit / classes``
samples of each class (all with no limit), sorted by class then original index; class ``c`` is
named ``str(c)``. That is the order timm lists an image folder in, so a WebDataset written here
with shuffling off gives the folder's minibatches.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .memory import Dataset, load_dataset

FORMATS = ("folder", "tar", "wds", "hf")
SPLITS = {"train": "train", "test": "val"}  # in-memory split -> folder name


def select(dataset: Dataset, limit: int | None) -> list[int]:
    """Sample indices to export: up to ceil(limit / classes) per class, by class then index."""
    targets = dataset.targets.numpy()
    per_class = None if limit is None else -(-limit // dataset.num_classes)
    chosen = []
    for c in range(dataset.num_classes):
        rows = np.flatnonzero(targets == c)
        chosen.extend(int(i) for i in rows[:per_class])
    return chosen


def encode(pixels: np.ndarray, ext: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if ext == "jpg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def samples(dataset: Dataset, limit: int | None, ext: str) -> Iterator[tuple[int, int, bytes]]:
    """(original index, class, encoded image) in export order."""
    if dataset.images is None:
        raise DataError(
            f"data.dataset={dataset.name}: not images; export mnist, fashion_mnist, "
            "cifar10 or cifar100"
        )
    for i in select(dataset, limit):
        yield i, int(dataset.targets[i]), encode(dataset.images[i], ext)


def export_data(
    name: str,
    fmt: str,
    out: str | Path,
    limit: int | None = None,
    ext: str = "png",
    shard_size: int = 1000,
    root: str | None = None,
) -> dict[str, int]:
    """Write ``name`` (both splits) to ``out`` in format ``fmt``; return samples per split."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if ext not in ("png", "jpg"):
        raise DataError(f"--ext {ext}: use png or jpg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, splits = {}, {}
    for split, folder in SPLITS.items():
        dataset = load_dataset(name, split, root)
        splits[folder] = list(samples(dataset, limit, ext))
        written[folder] = len(splits[folder])
    classes = [str(c) for c in range(dataset.num_classes)]
    if fmt == "folder":
        _write_folder(out, splits, ext)
    elif fmt == "tar":
        _write_tars(out, splits, ext)
    elif fmt == "wds":
        _write_shards(out, name, classes, splits, ext, shard_size)
    else:
        _write_hf(out, classes, splits)
    return written


def _write_folder(out: Path, splits: dict, ext: str) -> None:
    for folder, rows in splits.items():
        for i, c, data in rows:
            path = out / folder / str(c) / f"{i:05d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _write_tars(out: Path, splits: dict, ext: str) -> None:
    for folder, rows in splits.items():
        with tarfile.open(out / f"{folder}.tar", "w") as archive:
            for i, c, data in rows:
                _add(archive, f"{c}/{i:05d}.{ext}", data)


def _write_shards(
    out: Path, name: str, classes: list[str], splits: dict, ext: str, shard_size: int
) -> None:
    """Shards of ``shard_size`` samples (key = position, ``.png``/``.jpg`` and ``.cls``) and
    timm's ``_info.json`` with the shard lengths and the class names."""
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be >= 1")
    info = {"name": name, "classes": classes, "splits": {}}
    for folder, rows in splits.items():
        split = "train" if folder == "train" else "validation"
        filenames, lengths = [], []
        for k, start in enumerate(range(0, len(rows), shard_size)):
            filename = f"{split}-{k:06d}.tar"
            chunk = rows[start : start + shard_size]
            with tarfile.open(out / filename, "w") as archive:
                for position, (_, c, data) in enumerate(chunk, start):
                    _add(archive, f"{position:08d}.{ext}", data)
                    _add(archive, f"{position:08d}.cls", str(c).encode())
            filenames.append(filename)
            lengths.append(len(chunk))
        info["splits"][split] = {
            "name": split,
            "num_samples": len(rows),
            "filenames": filenames,
            "shard_lengths": lengths,
        }
    (out / "_info.json").write_text(json.dumps(info, indent=1))


def _write_hf(out: Path, classes: list[str], splits: dict) -> None:
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}
    )
    parts = {}
    for folder, rows in splits.items():
        columns = {
            "image": [{"bytes": data, "path": None} for _, _, data in rows],
            "label": [c for _, c, _ in rows],
        }
        parts["train" if folder == "train" else "validation"] = datasets.Dataset.from_dict(
            columns, features=features
        )
    datasets.DatasetDict(parts).save_to_disk(str(out))
