"""``mpc-dist bench-data``: decoded + augmented images/s of our Loader next to timm's own
``create_loader`` on the same image folder and the same timm transforms, in one run, interleaved
(each round runs every loader, in an order that turns round by round, so all see the same machine
load); the median round is reported with the spread of the rounds.

timm's loader runs twice: as timm's train.py runs it on a CPU (``use_prefetcher=False``: the
whole transform per image, normalization included) and with its prefetcher (uint8 batches,
normalized by ``PrefetchLoader`` in the consuming process, as on a GPU). Images per CPU second
count the consuming process and its loader workers together."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..config import AugmentConfig, DataConfig
from .loader import Loader
from .sources import open_source

OURS, TIMM, PREFETCHER = "mpc_dist Loader", "timm create_loader", "timm create_loader prefetcher"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="an image folder (root/train/<class>/...)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (each side)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per side")
    parser.add_argument(
        "--auto-augment",
        default="rand-m9-mstd0.5-inc1",
        help="timm's policy string; 'none' for none",
    )
    parser.add_argument("--re-prob", type=float, default=0.25, help="random erasing")


def _children() -> list[int]:
    """Process ids of this process's children (Linux /proc; the loader workers)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process and its children: the live ``pids`` from Linux /proc (0 where
    it cannot be read), plus the children that ended and were reaped (a loader's workers stop
    after its last batch: their time must not drop out of the count)."""
    times = os.times()
    total = time.process_time() + times.children_user + times.children_system
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _rate(batches: Iterable, count: int, batch_size: int) -> tuple[float, float]:
    """Images per second of wall-clock time, and per CPU second of this process and its loader
    workers together (a cost that other load on the machine leaves nearly alone), over
    ``count`` batches after the first (which pays for the workers' start)."""
    iterator = iter(batches)
    next(iterator)
    pids = _children()
    start, cpu = time.perf_counter(), _cpu_seconds(pids)
    for _ in range(count):
        next(iterator)
    images = count * batch_size
    used = _cpu_seconds(pids) - cpu
    del iterator, batches  # its workers end here, not during the next loader's round
    return images / (time.perf_counter() - start), images / used


def _ours(args: argparse.Namespace, augment: AugmentConfig, epoch: int) -> Iterable:
    data = DataConfig(
        dataset="folder",
        root=args.root,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    loader = Loader(open_source(data, "train"), data, augment, "train", seed=epoch)
    return loader.epoch(epoch)


def _timm(args: argparse.Namespace, augment: AugmentConfig, prefetcher: bool) -> Iterable:
    import torch
    from timm.data import create_dataset, create_loader

    from .augment import IMAGENET_MEAN, IMAGENET_STD, install_posterize_fix

    install_posterize_fix()  # the same RandAugment ops on both sides
    dataset = create_dataset("", root=args.root, split="train", is_training=True)
    return create_loader(
        dataset,
        input_size=(3, args.image_size, args.image_size),
        batch_size=args.batch_size,
        is_training=True,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment,
        interpolation=augment.interpolation,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        re_prob=augment.re_prob,
        re_mode=augment.re_mode,
        num_workers=args.workers,
        use_prefetcher=prefetcher,
        device=torch.device("cpu"),
        persistent_workers=False,
    )


def main(args: argparse.Namespace) -> dict:
    policy = None if args.auto_augment in ("", "none") else args.auto_augment
    augment = AugmentConfig(
        enabled=True, auto_augment=policy, re_prob=args.re_prob, interpolation="bicubic"
    )
    loaders: dict[str, Callable[[int], Iterable]] = {
        OURS: lambda epoch: _ours(args, augment, epoch),
        TIMM: lambda _: _timm(args, augment, prefetcher=False),
        PREFETCHER: lambda _: _timm(args, augment, prefetcher=True),
    }
    names = list(loaders)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            rates[name].append(_rate(loaders[name](round_), args.batches, args.batch_size))
    return _report(args, policy, rates)


def _report(args: argparse.Namespace, policy: str | None, rates: dict[str, list]) -> dict:
    workers = max(1, args.workers)
    print(
        f"{args.root}: {args.image_size} px, batch {args.batch_size}, {args.workers} workers, "
        f"auto_augment={policy}, re_prob={args.re_prob}; median [min, max] of {args.repeats} "
        f"interleaved rounds of {args.batches} batches; load average {os.getloadavg()[0]:.1f}"
    )
    result: dict = {"rounds": {n: [(w / workers, c) for w, c in v] for n, v in rates.items()}}
    for name, values in rates.items():
        walls = [wall / workers for wall, _ in values]
        cpus = [cpu for _, cpu in values]
        result[name], result[f"{name} cpu"] = statistics.median(walls), statistics.median(cpus)
        print(
            f"{name:<30} {result[name]:8.1f} [{min(walls):.0f}, {max(walls):.0f}] images/s per "
            f"worker  {result[f'{name} cpu']:8.1f} [{min(cpus):.0f}, {max(cpus):.0f}] per CPU "
            "second"
        )
    for other in (TIMM, PREFETCHER):
        ratio = result[OURS] / result[other]
        cpu_ratio = result[f"{OURS} cpu"] / result[f"{other} cpu"]
        print(f"ours / {other}: {ratio:.3f} per worker, {cpu_ratio:.3f} per CPU second")
    return result
