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

from ..console import console
from .cases import SYSTEMS, BenchOptions

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
        "--real", action="store_true", help="real residual MLP blocks instead of emulated ones"
    )
    parser.add_argument("--hidden", type=int, default=d.hidden, help="--real: MLP hidden width")
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


def check(options: BenchOptions) -> None:
    """Refuse, in one line, what the bench cannot compare fairly."""
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
    options = BenchOptions.from_args(args)
    check(options)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
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
