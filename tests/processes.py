"""Run a test function in N gloo processes; fail fast, name the rank that failed.

The ranks are forked from a forkserver that has imported torch and mpc_dist once per pytest
worker: a spawned rank would spend 3-6 s of CPU on those imports, which on two cores was a
large share of the suite's time."""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a rank imports anyway; the forkserver imports it once, before any process group exists.
# torch._dynamo: torch imports it at the first operation on the meta device, where models are
# built (with FSDP2, DTensor and sympy: 2.6 s of CPU here).
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "mpc_dist.cli", "mpc_dist.train",
           "mpc_dist.rules", "helpers", "launching"]  # fmt: skip


def _entry(rank: int, world: int, port: int, environ, fn, args, errors) -> None:
    os.environ.clear()  # the caller's environment now, not the forkserver's from its start
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def queue():
    """A queue the ranks of ``run`` can put results on (one of the ranks' own context)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts, at the first call
    return ctx.SimpleQueue()


def run(fn, world: int, *args, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; raise naming any failed rank."""
    errors = queue()
    context = mp.start_processes(
        _entry,
        args=(world, free_port(), dict(os.environ), fn, args, errors),
        nprocs=world,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(context.processes) if p.is_alive()]
                raise AssertionError(f"timed out after {timeout:.0f} s; ranks {alive} still run")
    except AssertionError:
        raise
    except Exception as error:
        reports = []
        while not errors.empty():
            rank, text = errors.get()
            reports.append(f"--- rank {rank} ---\n{text}")
        raise AssertionError("\n".join(reports) or str(error)) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
