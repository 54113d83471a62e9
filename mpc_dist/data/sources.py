"""Where samples come from: ``open_source`` lists a split (it reads no image) and returns

* ``MemorySource``: a set held in memory (MNIST, Fashion-MNIST, CIFAR, synthetic),
* ``FileSource``: random access to image files through timm's readers (an image folder in the
  ImageNet layout, tar files) or a Hugging Face dataset saved on disk,
* ``ShardSource``: WebDataset shards read in order, each shard a stream.

The class index is the sorted order of the training split's class names (timm's natural sort) and
the evaluation split must hold the same classes.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..config import DataConfig
from .augment import IMAGENET_MEAN, IMAGENET_STD
from .errors import DataError
from .memory import DATASETS as MEMORY_DATASETS
from .memory import Dataset, load_dataset

DISK_DATASETS: tuple[str, ...] = ("folder", "tar", "wds", "hf")
DATASETS: tuple[str, ...] = (*MEMORY_DATASETS, *DISK_DATASETS)
DEFAULT_IMAGE_SIZE = 224  # disk sources without data.image_size (timm's default)
SPLIT_FOLDERS = {"train": ("train", "training"), "test": ("val", "validation", "test")}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # WebDataset members holding the image


def split_name(split: str) -> str:
    """'train', or 'test' for the evaluation split (also called val, validation, eval)."""
    if split in ("train", "training"):
        return "train"
    if split in ("test", "val", "validation", "eval"):
        return "test"
    raise ValueError(f"split={split!r}: expected train or test (val)")


class MemorySource:
    """A set held in memory; ``image_path`` sends it through timm's transforms as images."""

    kind = "memory"

    def __init__(self, dataset: Dataset, image_size: int | None) -> None:
        self.dataset = dataset
        self.name = dataset.name
        self.num_classes = dataset.num_classes
        self.classes = [str(c) for c in range(dataset.num_classes)]
        self.native_size = dataset.input_shape[1]
        self.image_size = image_size or self.native_size
        self.mean, self.std = dataset.mean, dataset.std
        self.targets = dataset.targets

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.dataset.input_shape[0], self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> tuple[Image.Image, int, str]:
        pixels = self.dataset.images[index]
        return Image.fromarray(pixels), int(self.targets[index]), f"{self.name}[{index}]"


class FileSource:
    """Random access to images on disk: (file object, class index, name) per sample."""

    kind = "files"

    def __init__(
        self, name: str, reader: Any, classes: list[str], targets: list[int], image_size: int
    ) -> None:
        self.name, self.reader, self.classes = name, reader, classes
        self.num_classes = len(classes)
        self.targets = targets
        self.image_size = image_size
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.targets)

    def read(self, index: int) -> tuple[BinaryIO, int, str]:
        return self.reader.open(index), self.targets[index], self.reader.name(index)


class ShardSource:
    """WebDataset shards (tar files of ``key.png``/``key.jpg`` and ``key.cls``), in the order of
    the split's file list; the sample index is the position in that concatenated order."""

    kind = "shards"

    def __init__(
        self, shards: list[str], lengths: list[int], classes: list[str], image_size: int
    ) -> None:
        self.name = "wds"
        self.shards, self.lengths, self.classes = shards, lengths, classes
        self.offsets = [int(x) for x in np.cumsum([0, *lengths])[:-1]]
        self.num_classes = len(classes)
        self.image_size = image_size
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return sum(self.lengths)

    def samples(self, shard: int) -> Iterator[tuple[str, bytes, int]]:
        """(key, image bytes, class index) of one shard in stored order; a truncated or corrupt
        shard raises ``tarfile.TarError`` or ``OSError`` where its intact part ends."""
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        path = self.shards[shard]
        with open(path, "rb") as stream:
            files = ({**member, "__url__": path} for member in tar_file_iterator(stream))
            for sample in group_by_keys(files):
                image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                if image is None or "cls" not in sample:
                    raise tarfile.ReadError(f"sample {sample['__key__']} lacks an image or .cls")
                yield sample["__key__"], image, int(sample["cls"])


# ----------------------------------------------------------------------------- readers


class FolderReader:
    """Files listed by timm's ``find_images_and_targets`` (sorted by timm's natural key)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def open(self, index: int) -> BinaryIO:
        return open(self.paths[index], "rb")

    def name(self, index: int) -> str:
        return self.paths[index]


class TarReader:
    """timm's ``ReaderImageInTar``: one tar of class folders, or a folder of per-class tars."""

    def __init__(self, reader: Any, root: str) -> None:
        self.reader, self.root = reader, root
        self.pid = os.getpid()

    def open(self, index: int) -> BinaryIO:
        if os.getpid() != self.pid:  # a forked worker: the tar handles (and offsets) are shared
            self.pid = os.getpid()
            for state in _tar_states(self.reader.tar_state):
                state.reset()
                for child in state.children.values():
                    child.reset()
        return self.reader[index][0]

    def name(self, index: int) -> str:
        return f"{self.root}:{self.reader.samples[index][0].name}"


def _tar_states(tar_state: Any) -> list[Any]:
    return list(tar_state.values()) if isinstance(tar_state, dict) else [tar_state]


class HfReader:
    """A Hugging Face dataset with its image column undecoded (bytes or a path per row)."""

    def __init__(self, dataset: Any, image_key: str, root: str) -> None:
        self.dataset, self.image_key, self.root = dataset, image_key, root

    def open(self, index: int) -> BinaryIO:
        image = self.dataset[index][self.image_key]
        if image.get("bytes"):
            return io.BytesIO(image["bytes"])
        return open(image["path"], "rb")

    def name(self, index: int) -> str:
        return f"{self.root}[{index}]"


# ----------------------------------------------------------------------------- open


Source = MemorySource | FileSource | ShardSource


def open_source(data: DataConfig, split: str, seed: int = 0) -> Source:
    """List one split of ``data.dataset`` (cheap: reads no image; in-memory sets load whole)."""
    split = split_name(split)
    if data.dataset in MEMORY_DATASETS:
        dataset = load_dataset(
            data.dataset, split, data.root, data.synthetic_size, seed, data.standardise
        )
        return MemorySource(dataset, data.image_size)
    if data.dataset not in DISK_DATASETS:
        raise DataError(f"data.dataset={data.dataset!r}: unknown; use one of {', '.join(DATASETS)}")
    root = disk_root(data)
    size = data.image_size or DEFAULT_IMAGE_SIZE
    needs = {"hf": "datasets", "wds": "webdataset"}.get(data.dataset)
    if needs and importlib.util.find_spec(needs) is None:
        raise DataError(
            f"data.dataset={data.dataset}: needs the {needs} package; pip install {needs}"
        )
    if data.dataset == "folder":
        return open_folder(root, split, size)
    if data.dataset == "tar":
        return open_tar(root, split, size)
    if data.dataset == "hf":
        return open_hf(root, split, size)
    return open_shards(root, split, size)


def require_package(dataset: str) -> None:
    """hf needs ``datasets``, wds ``webdataset`` (dependencies of mpc-dist; a trimmed
    environment may lack them)."""
    needs = {"hf": "datasets", "wds": "webdataset"}.get(dataset)
    if needs and importlib.util.find_spec(needs) is None:
        raise DataError(f"data.dataset={dataset}: needs the {needs} package; pip install {needs}")


def disk_root(data: DataConfig) -> Path:
    if data.root is None:
        raise DataError(f"data.root: data.dataset={data.dataset} reads from disk; set data.root")
    root = Path(data.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root={data.root}: no such folder; set data.root to the dataset's")
    return root


def split_path(root: Path, split: str, suffix: str = "", field: str = "data.root") -> Path:
    """root/train (or train.tar...), or root/val, validation or test for evaluation."""
    names = SPLIT_FOLDERS[split]
    for name in names:
        path = root / f"{name}{suffix}"
        if path.exists():
            return path
    wanted = f"{names[0]}{suffix}" + (
        f" (or {', '.join(n + suffix for n in names[1:])})" if len(names) > 1 else ""
    )
    raise DataError(f"{field}={root}: no {wanted} in it; the layout is root/train and root/val")


def class_folders(split_dir: Path) -> list[str]:
    """Class folder names of a split, sorted as timm sorts them."""
    from timm.utils.misc import natural_key

    return sorted((p.name for p in split_dir.iterdir() if p.is_dir()), key=natural_key)


def same_classes(train: list[str], other: list[str], where: str) -> None:
    """Refuse an evaluation split whose class names differ from the training split's."""
    if train == other:
        return
    only_train = sorted(set(train) - set(other))[:3]
    only_other = sorted(set(other) - set(train))[:3]
    raise DataError(
        f"data.root={where}: train and val hold different classes ({len(train)} vs {len(other)};"
        f" only in train: {only_train}, only in val: {only_other}); give both the same class "
        "folders"
    )


def open_folder(root: Path, split: str, size: int) -> FileSource:
    from timm.data.readers.img_extensions import get_img_extensions
    from timm.data.readers.reader_image_folder import find_images_and_targets

    classes = check_folder_classes(root)
    split_dir = split_path(root, split)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples, _ = find_images_and_targets(str(split_dir), class_to_idx=class_to_idx)
    counts = np.bincount([t for _, t in samples], minlength=len(classes))
    if (counts == 0).any():
        empty = classes[int(np.argmin(counts))]
        raise DataError(
            f"data.root={root}: class folder {split_dir.name}/{empty} holds no images "
            f"({' '.join(get_img_extensions())}); add images or remove the folder from every split"
        )
    paths = [p for p, _ in samples]
    return FileSource("folder", FolderReader(paths), classes, [t for _, t in samples], size)


def check_folder_classes(root: Path) -> list[str]:
    """The training split's class names, checked against the evaluation split's and for empty
    class folders (one directory listing per class: no image is opened)."""
    from timm.data.readers.img_extensions import get_img_extensions

    extensions = get_img_extensions(as_set=True)
    per_split = {}
    for split in ("train", "test"):
        split_dir = split_path(root, split)
        classes = class_folders(split_dir)
        if not classes:
            raise DataError(
                f"data.root={root}: {split_dir.name}/ has no class folders; put each class's "
                f"images in {split_dir.name}/<class>/"
            )
        for name in classes:
            if not any(_has_image(split_dir / name, extensions)):
                raise DataError(
                    f"data.root={root}: class folder {split_dir.name}/{name} holds no images "
                    f"({' '.join(sorted(extensions))}); add images or remove the folder from "
                    "every split"
                )
        per_split[split] = classes
    same_classes(per_split["train"], per_split["test"], str(root))
    return per_split["train"]


def _has_image(folder: Path, extensions: set[str]) -> Iterator[bool]:
    for _, _, files in os.walk(folder, followlinks=True):
        for name in files:
            if os.path.splitext(name)[1].lower() in extensions:
                yield True
                return


def open_tar(root: Path, split: str, size: int) -> FileSource:
    from timm.data.readers.reader_image_in_tar import ReaderImageInTar

    readers = {}
    for name in ("train", split):
        path = tar_split_path(root, name)
        try:
            readers[name] = ReaderImageInTar(str(path))
        except (tarfile.TarError, OSError, EOFError, AssertionError) as exc:
            raise DataError(
                f"data.root={root}: cannot index {path} ({exc}); replace the truncated or "
                "corrupt tar with an intact copy"
            ) from exc
    for name, reader in readers.items():
        _check_tar_ends(reader, tar_split_path(root, name), root)
    classes = sorted(readers["train"].class_name_to_idx, key=readers["train"].class_name_to_idx.get)
    reader = readers[split]
    own = sorted(reader.class_name_to_idx, key=reader.class_name_to_idx.get)
    same_classes(classes, own, str(root))
    targets = [int(t) for t in reader.targets]
    return FileSource(
        "tar", TarReader(reader, str(tar_split_path(root, split))), classes, targets, size
    )


def _check_tar_ends(reader: Any, path: Path, root: Path) -> None:
    """A tar read as a stream ends quietly where it was cut: refuse one whose last member runs
    past the end of the file or that lacks the end-of-archive blocks."""
    ends: dict[str, int] = {}
    for info, parent, child in reader.samples:
        if child is None:  # members of a tar inside a tar are checked when read
            end = info.offset_data + -(-info.size // 512) * 512
            ends[parent or ""] = max(ends.get(parent or "", 0), end)
    for parent, end in ends.items():
        file = path / parent if parent else path
        if os.path.getsize(file) < end + 1024:
            raise DataError(
                f"data.root={root}: cannot index {file} (truncated: it ends inside or right "
                "after its last image); replace the truncated or corrupt tar with an intact copy"
            )


def tar_split_path(root: Path, split: str) -> Path:
    try:
        return split_path(root, split, ".tar")
    except DataError:
        return split_path(root, split)  # a folder of per-class tars


def open_hf(root: Path, split: str, size: int) -> FileSource:
    import datasets

    splits = {name: hf_split(root, name) for name in ("train", split)}
    image_key, label_key = hf_columns(splits["train"], root)
    classes = list(splits["train"].features[label_key].names)
    own = splits[split].features.get(label_key)
    same_classes(classes, list(getattr(own, "names", [])), str(root))
    dataset = splits[split].cast_column(image_key, datasets.Image(decode=False))
    targets = [int(t) for t in dataset[label_key]]
    return FileSource("hf", HfReader(dataset, image_key, str(root)), classes, targets, size)


def hf_split(root: Path, split: str) -> Any:
    """A split of a dataset saved with ``save_to_disk``: a DatasetDict, or one folder per split."""
    import datasets

    names = SPLIT_FOLDERS[split]
    try:
        if any((root / n / "dataset_info.json").is_file() for n in names):
            return datasets.load_from_disk(str(split_path(root, split)))
        saved = datasets.load_from_disk(str(root))
    except FileNotFoundError as exc:
        raise DataError(
            f"data.root={root}: not a dataset saved with save_to_disk ({exc}); save it with "
            "DatasetDict.save_to_disk(data.root)"
        ) from exc
    if not isinstance(saved, datasets.DatasetDict):
        raise DataError(
            f"data.root={root}: holds one split; save a DatasetDict with train and "
            "validation (or test) splits"
        )
    for name in names:
        if name in saved:
            return saved[name]
    raise DataError(f"data.root={root}: no split {names[0]} (has {list(saved)}); add it")


def hf_columns(dataset: Any, root: Path) -> tuple[str, str]:
    import datasets

    features = dataset.features
    image = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    label = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image is None or label is None:
        raise DataError(
            f"data.root={root}: needs an Image column and a ClassLabel column (has "
            f"{dict(features)}); cast them with dataset.cast_column"
        )
    return image, label


def read_shard_info(root: Path) -> dict[str, Any]:
    """timm's WebDataset ``_info.json`` (splits with filenames and shard_lengths) plus
    ``classes``; it lets every rank know the sample count without reading a shard."""
    for name in ("_info.json", "info.json"):
        path = root / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"data.root={root}: {name} is not JSON ({exc}); rewrite it"
                ) from exc
    raise DataError(
        f"data.root={root}: no _info.json describing the shards; write one (mpc-dist export-data "
        "does; format in docs/data.md)"
    )


def open_shards(root: Path, split: str, size: int) -> ShardSource:
    info = read_shard_info(root)
    splits = info.get("splits", {})
    name = next((n for n in SPLIT_FOLDERS[split] if n in splits), None)
    if name is None:
        raise DataError(
            f"data.root={root}: _info.json has no split {SPLIT_FOLDERS[split][0]} "
            f"(has {list(splits)}); add it"
        )
    entry = splits[name]
    classes = [str(c) for c in info.get("classes", [])]
    if not classes:
        raise DataError(
            f"data.root={root}: _info.json lacks 'classes' (the class names in index order); add it"
        )
    shards = [str(root / f) for f in entry["filenames"]]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DataError(
            f"data.root={root}: shard {missing[0]} listed in _info.json is missing; "
            "restore it or rewrite _info.json"
        )
    return ShardSource(shards, [int(n) for n in entry["shard_lengths"]], classes, size)
