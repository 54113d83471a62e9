"""The data path: in-memory sets and images from disk (an image folder, tar files, WebDataset
shards, Hugging Face datasets on disk) through timm's readers and transforms, minibatches that
depend only on (seed, epoch), and the checks, export and benchmark around them (docs/data.md)."""

from .augment import (
    MicrobatchMixup,
    build_transform,
    install_posterize_fix,
    mixes,
    safe_posterize,
)
from .batches import WHOLE, Shard, count_batches, epoch_order, minibatches, num_batches
from .checks import check_data, check_num_classes
from .errors import DataError
from .loader import Loader
from .memory import SHAPES, Dataset, load_dataset, read_idx
from .sources import (
    DATASETS,
    DISK_DATASETS,
    FileSource,
    MemorySource,
    ShardSource,
    Source,
    open_source,
)

__all__ = [
    "DATASETS",
    "DISK_DATASETS",
    "SHAPES",
    "WHOLE",
    "DataError",
    "Dataset",
    "FileSource",
    "Loader",
    "MemorySource",
    "MicrobatchMixup",
    "Shard",
    "ShardSource",
    "Source",
    "build_transform",
    "check_data",
    "check_num_classes",
    "count_batches",
    "epoch_order",
    "install_posterize_fix",
    "load_dataset",
    "minibatches",
    "mixes",
    "num_batches",
    "open_source",
    "read_idx",
    "safe_posterize",
]
