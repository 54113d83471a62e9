"""Timing and memory where the bench's work runs. On the CPU a step is timed with the host
clock. On a GPU kernels run after the host has queued them, so the host clock would read launch
times: every step starts with the device idle on every rank (synchronise, barrier,
synchronise), is timed with CUDA events on the compute stream, and is read only after a
synchronisation. The events are placed on the host clock from the step's start (when the device
was idle), so windows and our runtime's per-action events line up across ranks."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..parallel import EventClock


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """(start, end) of each timed step in host-clock seconds, every rank starting together."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.windows: list[tuple[float, float]] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Time the body: from a barrier with the device idle to its last queued kernel."""
        synchronize(self.device)
        dist.barrier()
        synchronize(self.device)  # under NCCL the barrier itself is a kernel
        clock = EventClock(self.device)
        start = clock.now()
        yield
        clock.marks.append((None, start, clock.now()))
        ((_, begin, end),) = clock.intervals()  # synchronises on CUDA
        self.windows.append((begin, end))

    def durations(self, skip: int = 0) -> list[float]:
        """Seconds of the steps after the first ``skip``."""
        return [end - start for start, end in self.windows[skip:]]


class PeakMemory:
    """``torch.cuda.max_memory_allocated`` over one case on this rank, beyond what was allocated
    when it started (None on the CPU, where the saved-activation count is the measure)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0
        if device.type == "cuda":
            gc.collect()  # the previous case's modules and buffers
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)

    def peak_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.start
