"""What every study shares: a run's config (the quickstart's, quiet, under the study's folder),
training it once (a run finished under ``--out`` is read back, not trained again), runs in a
pool of worker processes, and a finished run's evaluations and weights."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..config import Config, load_config
from ..models import BlockModel
from ..train import Checkpointer, build_optimizer
from ..train.metrics import MetricsLogger

BASE = "configs/quickstart.yaml"
# the studies' tiny ViT: overrides of BASE
TINY_VIT = [
    "model.name=vit_tiny",
    "model.num_blocks=4",
    "model.width=64",
    "model.hidden=128",
    "model.num_heads=4",
    "model.patch_size=7",
    "optim.weight_decay=0.05",
]
Item = TypeVar("Item")


def num_blocks(overrides: Sequence[str]) -> int:
    """T of a network given as config overrides (its ``model.num_blocks=...``)."""
    return next(int(o.split("=")[1]) for o in overrides if o.startswith("model.num_blocks="))


def study_config(settings: Sequence[str], out: str, name: str, more: Sequence[str] = ()) -> Config:
    """The quickstart config with ``settings``, run ``name`` under ``out``/runs, without progress
    bar, TensorBoard or plot; ``more`` overrides come last (they may replace settings)."""
    quiet = ["run.progress=false", "run.tensorboard=false", "run.plot=false"]
    return load_config(
        BASE, [*settings, f"run.out_dir={out}/runs", f"run.name={name}", *quiet, *more]
    )


def train_once(config: Config, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result, kept as ``study.json`` in the run's folder: computed (on one thread)
    only where no earlier study finished it."""
    done = config.run_dir / "study.json"
    if not done.exists():
        torch.set_num_threads(1)
        done.write_text(json.dumps(run()))
    return json.loads(done.read_text())


def evaluations(config: Config) -> list[dict[str, Any]]:
    """The run's evaluation records (step, loss, accuracy, ...), in order."""
    records = MetricsLogger.read(config.run_dir / "metrics.jsonl")
    return [r for r in records if r["kind"] == "eval"]


def in_processes(
    work: Callable[[Item], dict[str, Any]], items: Sequence[Item], workers: int
) -> Iterator[tuple[Item, dict[str, Any], float]]:
    """``work`` on every item in ``workers`` processes: (item, result, seconds since the start)
    in the items' order, as they finish."""
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        for item, result in zip(items, pool.map(work, items), strict=True):
            yield item, result, time.perf_counter() - started


def load_final_weights(config: Config, model: BlockModel) -> BlockModel:
    """``model`` with the weights of the run's latest checkpoint."""
    checkpoints = Checkpointer(config.run_dir / "checkpoints")
    checkpoints.load(checkpoints.latest(), model, build_optimizer(config.optim, model.parameters()))
    return model


def replace_between(path: Path, begin: str, end: str, text: str, heading: str) -> None:
    """Put ``text`` between the markers ``begin`` and ``end`` of the document at ``path``,
    keeping what is written around them; without the markers, append ``heading`` and them."""
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + begin + "\n" + text + end + rest.split(end, 1)[1]
    else:
        new = (old.rstrip("\n") + "\n\n" if old else "") + f"{heading}\n\n{begin}\n{text}{end}\n"
    path.write_text(new)
