"""``mpc-dist bench-data``: decoded + augmented images/s of our Loader next to timm's own
``create_loader`` on the same image folder and the same timm transforms, in one run, interleaved
(ours, timm's, ours, ...) so both see the same machine load; the median round is reported."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..config import AugmentConfig, DataConfig
from .loader import Loader
from .sources import open_source


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


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes (Linux /proc; 0 where it cannot be read)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _rate(
    batches: Iterable, count: int, batch_size: int, workers: Callable[[Any], list]
) -> tuple[float, float]:
    """Images per second of wall-clock time, and per CPU second of this process and its loader
    workers together (a cost that other load on the machine leaves nearly alone), over
    ``count`` batches after the first (which pays for the workers' start)."""
    iterator = iter(batches)
    next(iterator)
    pids = [w.pid for w in workers(iterator)]
    start, cpu = time.perf_counter(), time.process_time() + _cpu_seconds(pids)
    for _ in range(count):
        next(iterator)
    images = count * batch_size
    used = time.process_time() + _cpu_seconds(pids) - cpu
    return images / (time.perf_counter() - start), images / used


def _ours(args: argparse.Namespace, augment: AugmentConfig, epoch: int) -> tuple[float, float]:
    data = DataConfig(
        dataset="folder",
        root=args.root,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    loader = Loader(open_source(data, "train"), data, augment, "train", seed=epoch)
    workers = lambda _: loader._loader._iterator._workers if args.workers else []  # noqa: E731
    return _rate(loader.epoch(epoch), args.batches, args.batch_size, workers)


def _timm(args: argparse.Namespace, augment: AugmentConfig) -> tuple[float, float]:
    from timm.data import create_dataset, create_loader

    from .augment import IMAGENET_MEAN, IMAGENET_STD, install_posterize_fix

    install_posterize_fix()  # the same RandAugment ops on both sides
    dataset = create_dataset("", root=args.root, split="train", is_training=True)
    loader = create_loader(
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
        use_prefetcher=False,
        device="cpu",
        persistent_workers=False,
    )
    workers = lambda iterator: iterator._workers if args.workers else []  # noqa: E731
    return _rate(loader, args.batches, args.batch_size, workers)


def main(args: argparse.Namespace) -> dict[str, float]:
    policy = None if args.auto_augment in ("", "none") else args.auto_augment
    augment = AugmentConfig(
        enabled=True, auto_augment=policy, re_prob=args.re_prob, interpolation="bicubic"
    )
    rates: dict[str, list[tuple[float, float]]] = {"mpc_dist Loader": [], "timm create_loader": []}
    for round_ in range(args.repeats):
        rates["mpc_dist Loader"].append(_ours(args, augment, round_))
        rates["timm create_loader"].append(_timm(args, augment))
    workers = max(1, args.workers)
    print(
        f"{args.root}: {args.image_size} px, batch {args.batch_size}, {args.workers} workers, "
        f"auto_augment={policy}, re_prob={args.re_prob}; median of {args.repeats} rounds of "
        f"{args.batches} batches"
    )
    result = {}
    for name, values in rates.items():
        median = statistics.median(wall for wall, _ in values)
        cpu = statistics.median(c for _, c in values)
        result[name], result[f"{name} cpu"] = median / workers, cpu
        rounds = " ".join(f"{wall:.0f}/{c:.0f}" for wall, c in values)
        print(
            f"{name:<20} {median:8.1f} images/s  {median / workers:8.1f} per worker  "
            f"{cpu:8.1f} per CPU second  (rounds, images/s / per CPU s: {rounds})"
        )
    ratio = result["mpc_dist Loader"] / result["timm create_loader"]
    cpu_ratio = result["mpc_dist Loader cpu"] / result["timm create_loader cpu"]
    print(f"ours / timm's: {ratio:.3f} per worker, {cpu_ratio:.3f} per CPU second")
    return result
