"""`mpc-dist bench`: pipeline bubbles, throughput and activation memory of our schedules against
the field, at several microbatch counts.

All systems run the same emulated blocks (``emulate.py``) in one set of P processes, at every
m of ``--microbatches`` (default P and 4P): our BP-1F1B, BP-1F1B with deferred weight gradients
(zero-bubble's split), BP-GPipe and horizon schedules (rules x horizons x modes);
torch.distributed.pipelining's 1F1B, GPipe, Interleaved1F1B, InterleavedZeroBubble,
ZBVZeroBubble and DualPipeV; and DeepSpeed's PipelineEngine. Every number is measured from the
blocks' own timestamps, identically for every system, and ours are compared with the
simulator's prediction for the same schedule and costs. Peak activation memory is counted with
saved-tensor hooks on every rank.

With ``--real`` the blocks compute (a residual MLP, or a timm ViT-B/16 or ViT-L/16 block:
``--block``); ``--device cuda`` puts each stage on a GPU of its own, over NCCL, and times steps
and our runtime's actions with CUDA events (``timing.py``), and reports each rank's
``torch.cuda.max_memory_allocated`` beside its saved activations.

This module is the command line: the options (``cases.py``), one process per stage through
torchrun, each running ``worker.py``; rank 0 summarises (``summary.py``) and reports
(``report.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import time

import torch

from ..console import console
from ..devices import nvidia_gpus
from .cases import BLOCKS, DEVICES, PRECISIONS, SYSTEMS, BenchOptions

DEFAULTS = BenchOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's flags, one per field of ``BenchOptions`` (whose defaults they take)."""
    ints = lambda text: [int(x) for x in text.split(",")]
    names = lambda text: text.split(",")
    d = DEFAULTS
    parser.add_argument("--stages", type=int, default=d.stages)
    parser.add_argument("--microbatches", type=ints, help="m values (default: P,4P)")
    parser.add_argument("--microbatch-size", type=int, default=d.microbatch_size)
    parser.add_argument(
        "--width", type=int, default=d.width, help="activation width (real tensors)"
    )
    parser.add_argument(
        "--real", action="store_true", help="real blocks (--block) instead of emulated ones"
    )
    parser.add_argument(
        "--block",
        choices=BLOCKS,
        default=d.block,
        help="--real: residual MLP (--width, --hidden) or a timm ViT-B/16 / ViT-L/16 block",
    )
    parser.add_argument("--hidden", type=int, default=d.hidden, help="--real: MLP hidden width")
    parser.add_argument(
        "--tokens", type=int, default=d.tokens, help="ViT blocks: sequence length (197: 224 px)"
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=d.device,
        help="cuda: a GPU per stage over NCCL (with --real); auto: cuda for --real on GPUs",
    )
    parser.add_argument(
        "--precision", choices=tuple(PRECISIONS), default=d.precision, help="--real: autocast"
    )
    parser.add_argument("--blocks-per-stage", type=int, default=d.blocks_per_stage)
    parser.add_argument("--cost-ms", type=float, default=d.cost_ms, help="F = B = W per block")
    parser.add_argument(
        "--latency-ms", type=float, default=d.latency_ms, help="simulator message latency"
    )
    parser.add_argument("--horizons", type=ints, default=list(d.horizons))
    parser.add_argument(
        "--defer-horizons",
        type=ints,
        default=list(d.defer_horizons),
        help="also run these h with deferred W",
    )
    parser.add_argument("--rules", type=names, default=list(d.rules))
    parser.add_argument("--modes", type=names, default=list(d.modes))
    parser.add_argument(
        "--systems",
        type=names,
        default=list(d.systems),
        help=f"baselines (default all): {', '.join(SYSTEMS)}; none for ours only",
    )
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--out", default=d.out)


def resolve_device(options: BenchOptions) -> BenchOptions:
    """``--device auto``: CUDA for real blocks where torch can use a GPU, else the CPU; GPUs
    that torch cannot use are an error, not a silent CPU run."""
    if options.device != "auto":
        return options
    if options.real and not torch.cuda.is_available() and nvidia_gpus():
        raise SystemExit(
            f"mpc-dist bench: --device auto: {nvidia_gpus()} NVIDIA GPU(s) present but torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) cannot use them; install a torch "
            "build for this driver, or pass --device cpu"
        )
    cuda = options.real and torch.cuda.is_available()
    return dataclasses.replace(options, device="cuda" if cuda else "cpu")


def check(options: BenchOptions) -> None:
    """Refuse, in one line, what the bench cannot compare fairly or run here."""
    unknown = sorted(set(options.systems) - set(SYSTEMS) - {"none"})
    if unknown:
        raise SystemExit(
            f"mpc-dist bench: --systems {','.join(unknown)}: use {', '.join(SYSTEMS)} or none"
        )
    looped = sorted(set(options.systems) - {"1f1b", "gpipe", "deepspeed", "none"})
    if options.real and looped and options.blocks_per_stage % 2:
        raise SystemExit(
            f"mpc-dist bench: --real with {','.join(looped)} (two stages per rank) needs an "
            "even --blocks-per-stage, so that every system runs the same blocks"
        )
    if not options.real:
        for flag, value, default in (
            ("--block", options.block, DEFAULTS.block),
            ("--precision", options.precision, DEFAULTS.precision),
        ):
            if value != default:
                raise SystemExit(f"mpc-dist bench: {flag} {value} is for real blocks: add --real")
    if options.device == "cuda":
        _check_gpus(options)


def _check_gpus(options: BenchOptions) -> None:
    if not options.real:
        raise SystemExit(
            "mpc-dist bench: --device cuda needs --real: emulated blocks sleep, which measures "
            "nothing on a GPU"
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        raise SystemExit("mpc-dist bench: --device cuda: no usable GPU here; pass --device cpu")
    if gpus < options.stages:
        raise SystemExit(
            f"mpc-dist bench: --device cuda --stages {options.stages} needs a GPU per stage; "
            f"{gpus} usable here: pass --stages {gpus} or fewer, or --device cpu"
        )


def flags(options: BenchOptions) -> list[str]:
    """The command line that gives back ``options`` (for the processes torchrun starts)."""
    out = []
    for field in dataclasses.fields(options):
        flag, value = "--" + field.name.replace("_", "-"), getattr(options, field.name)
        if isinstance(value, bool):
            out += [flag] if value else []
        elif isinstance(value, tuple):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def main(args: argparse.Namespace) -> None:
    """Start one process per stage with torchrun; each runs ``worker.worker``."""
    options = resolve_device(BenchOptions.from_args(args))
    check(options)
    accelerator = "cuda" if options.device == "cuda" else "cpu"  # DeepSpeed's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": accelerator}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*torchrun, f"--nproc-per-node={options.stages}", "-m", __name__, *flags(options)]
    started = time.perf_counter()
    code = subprocess.call(command, env=env)
    console.print(f"bench finished in {time.perf_counter() - started:.0f} s")
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    from .worker import worker

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with contextlib.suppress(KeyboardInterrupt):
        worker(BenchOptions.from_args(parser.parse_args()))
