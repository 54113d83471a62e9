"""Moved to ``mpc_dist.data``; this name stays until the training modules import from there."""

from ..data import (  # noqa: F401
    DATASETS,
    SHAPES,
    WHOLE,
    DataError,
    Dataset,
    Shard,
    load_dataset,
    minibatches,
    num_batches,
)
