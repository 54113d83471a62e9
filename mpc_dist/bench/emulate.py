"""Emulated compute: blocks whose forward, input-gradient and weight-gradient take set times.

On a 2-core machine 8 stages cannot all compute at once, but they can all *sleep* at once: an
emulated block sleeps for its calibrated time while real, activation-sized tensors flow between
processes, so pipeline dynamics (bubbles, waiting, overlap) are those of 8 real devices.

The block is ``out = Sleep(x) + Sleep(weight)``: the two branches are separate autograd nodes,
so a backward that asks only for the input gradient (a stream passing through) sleeps the
input-gradient time only, one that asks only for the weight gradient sleeps the weight time
only, and a plain ``loss.backward()`` (torch.distributed.pipelining, DeepSpeed) sleeps both. The
same module runs under every system compared. A ``Recorder`` given to the blocks keeps every
sleep while it is recording.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..models import BlockModel

Sleep = tuple[str, int, float, float]  # (kind F|B|W, block, start, end), perf_counter seconds


class Recorder:
    """The sleeps of the emulated blocks, while ``recording``."""

    def __init__(self) -> None:
        self.recording = False
        self.events: list[Sleep] = []

    def take(self) -> list[Sleep]:
        """The sleeps recorded so far; starts a new record."""
        events, self.events = self.events, []
        return events


def _sleep(recorder: Recorder | None, kind: str, block: int, seconds: float) -> None:
    if seconds <= 0:
        return
    start = time.perf_counter()
    time.sleep(seconds)
    if recorder is not None and recorder.recording:
        recorder.events.append((kind, block, start, time.perf_counter()))


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, saved, block, forward_s: float, backward_kind: str, backward_s: float):
        _sleep(block.recorder, "F", block.block, forward_s)
        ctx.block, ctx.kind, ctx.seconds = block, backward_kind, backward_s
        # Keep the block's input, as a real layer does for either gradient: it is the
        # activation memory a stage holds.
        ctx.save_for_backward(saved)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.block.recorder, ctx.kind, ctx.block.block, ctx.seconds)
        return grad, None, None, None, None, None


class EmulatedBlock(nn.Module):
    def __init__(
        self,
        width: int,
        block: int,
        forward_s: float,
        input_grad_s: float,
        weight_grad_s: float,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.block, self.recorder = block, recorder
        self.forward_s, self.input_grad_s = forward_s, input_grad_s
        self.weight_grad_s = weight_grad_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved = x.detach()
        out = _Sleep.apply(x, saved, self, self.forward_s, "B", self.input_grad_s)
        return out + _Sleep.apply(self.weight, saved, self, 0.0, "W", self.weight_grad_s)


def emulated_model(
    num_blocks: int,
    width: int,
    forward_s: float,
    input_grad_s: float,
    weight_grad_s: float,
    num_classes: int = 10,
    aux_heads: bool = True,
    recorder: Recorder | None = None,
) -> BlockModel:
    """A BlockModel of emulated blocks; the (real, tiny) heads evaluate the loss points."""
    blocks = {
        t: EmulatedBlock(width, t, forward_s, input_grad_s, weight_grad_s, recorder)
        for t in range(num_blocks)
    }
    aux = {s: nn.Linear(width, num_classes) for s in range(1, num_blocks)} if aux_heads else {}
    head, head_mode = nn.Linear(width, num_classes), "aux" if aux_heads else "shared"
    model = BlockModel(nn.Identity(), blocks, head, aux, num_blocks, head_mode)
    model.input_shape = (width,)
    model.state_shapes = [(width,)] * (num_blocks + 1)
    return model
