"""The horizon engine: forward and stream-by-stream backward over a contiguous run of blocks.

The single-process trainer runs one engine over all blocks; the pipeline runtime runs one per
stage over that stage's blocks. Each block's forward is run once per microbatch and kept as its
own graph (its input is a detached leaf), so a stream is a chain of vector-Jacobian products
through the graphs it passes. A block's graph is freed when the last stream through it has passed.

``ComputeOptions`` adds mixed precision (autocast; the states between blocks, and so the
pipeline's messages, in the compute dtype; an optional loss scale for fp16) and activation
checkpointing (a block keeps only its input and recomputes its forward in its backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models import BlockModel
from .deferral import DeferredWeights, input_backward
from .engine import Engine, EngineOptions, ForwardResult
from .plan import Plan, Stream


@dataclass
class _Microbatch:
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # leaf input of block t
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # output of block t
    pending: dict[int, int] = field(default_factory=dict)  # streams yet to pass block t
    born: dict[int, torch.Tensor] = field(default_factory=dict)  # cotangent at x(s), not yet run
    deferred: dict[int, list[tuple[int, DeferredWeights]]] = field(default_factory=dict)  # by s
    forwarded: bool = False


class HorizonEngine(Engine):
    """The horizon rules (``receding``, ``shrinking``): streams of cotangents along the plan."""

    def __init__(self, model: BlockModel, plan: Plan, options: EngineOptions | None = None) -> None:
        super().__init__(model, plan, options)
        self.criterion, self.scale_loss = self.options.criterion, self.options.scale_loss
        blocks = model.block_indices
        self._through = {t: plan.streams_through(t) for t in blocks}
        # A block's input needs a gradient only if some stream continues below it.
        self._input_grad = {t: t > 0 and any(s.low < t for s in self._through[t]) for t in blocks}
        self._microbatches: dict[int, _Microbatch] = {}

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        microbatch: int,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_scale: float = 1.0,
        eager: bool = True,
    ) -> ForwardResult:
        """Forward one microbatch through the run, evaluating the loss points inside it.

        With ``eager`` every stream born here runs backward at once, as far as the run reaches,
        so its graphs are freed as early as possible; otherwise call ``backward(microbatch, s)``.
        """
        state = self._microbatches.setdefault(microbatch, _Microbatch())
        losses, cotangents, logits = {}, {}, None
        x = inputs
        for t in range(self.first, self.last):
            with self._hooks(), self.compute.autocast():
                leaf = x.detach().requires_grad_(self._input_grad[t])
                out = self.block_forward(t, leaf)
            state.inputs[t], state.outputs[t] = leaf, out
            state.pending[t] = len(self._through[t])
            x = self.compute.state(out)
            s = t + 1
            if s not in self.plan.loss_points:
                continue
            loss, cotangent, head_out = self._loss(s, x, targets, loss_scale)
            losses[s] = loss
            if s == self.plan.num_blocks:
                logits = head_out
            state.born[s] = cotangent
            if eager:
                below = self.backward(microbatch, s)
                if below is not None:
                    cotangents[s] = below
        state.forwarded = True
        self._release(microbatch, state)
        output = x if self.last < self.plan.num_blocks else None
        return ForwardResult(output, logits, losses, cotangents)

    def _loss(self, s: int, state: torch.Tensor, targets: torch.Tensor, scale: float):
        """l_s, its cotangent at x(s), and the head's output; trains the head if l_s owns it."""
        head, trainable = self.model.loss_head(s)
        leaf = state.detach().requires_grad_()
        with self._hooks(), self.compute.autocast():
            head_out = head(leaf)
            loss = self.criterion(head_out, targets) * scale
        params = [p for p in head.parameters() if p.requires_grad] if trainable else []
        scaled = self.scale_loss(loss) if self.scale_loss is not None else loss
        torch.autograd.backward(scaled, inputs=[leaf, *params])
        return loss.detach(), leaf.grad, head_out.detach()

    # ------------------------------------------------------------------ backward

    def backward(
        self,
        microbatch: int,
        loss_point: int,
        cotangent: torch.Tensor | None = None,
        defer_weights: bool = False,
    ) -> torch.Tensor | None:
        """Run stream ``loss_point`` through this run's blocks.

        ``cotangent`` is dl_s/dx(last) for a stream arriving from above; a stream born in the run
        uses the cotangent its loss produced. Returns dl_s/dx(first) if the stream continues
        below the run, else None. With ``defer_weights`` only input gradients are computed now;
        ``weight_backward(microbatch, loss_point)`` takes the stream's weight gradients later.
        """
        stream = self.plan.stream(loss_point)
        state = self._microbatches[microbatch]
        if cotangent is None:
            cotangent = state.born.pop(loss_point)
            top = loss_point - 1
        else:
            top = self.last - 1
        for t in range(top, max(stream.low, self.first) - 1, -1):
            cotangent = self._block_backward(state, stream, t, cotangent, defer_weights)
        self._release(microbatch, state)
        return cotangent if stream.low < self.first else None

    def weight_backward(self, microbatch: int, loss_point: int) -> None:
        """The weight gradients a deferred ``backward`` of stream ``loss_point`` left."""
        state = self._microbatches.get(microbatch)
        if state is None:  # released already: the stream's blocks had no trainable weights
            return
        for t, deferred in state.deferred.pop(loss_point, []):
            deferred.run()
            self._passed(state, t)
        self._release(microbatch, state)

    def _block_backward(
        self,
        state: _Microbatch,
        stream: Stream,
        t: int,
        cotangent: torch.Tensor,
        defer_weights: bool = False,
    ) -> torch.Tensor | None:
        leaf, out = state.inputs[t], state.outputs[t]
        wants_input = t > stream.low and leaf.requires_grad
        params = self.model.block_parameters(t) if stream.trains(t) else []
        params = [p for p in params if p.requires_grad]
        if defer_weights and params:  # the block's graph stays until the weight pass
            cotangent = cotangent.to(out.dtype)
            if wants_input:
                grad, deferred = input_backward(out, cotangent, leaf, params)
            else:
                grad, deferred = None, DeferredWeights(whole=(out, cotangent, params))
            state.deferred.setdefault(stream.loss_point, []).append((t, deferred))
            return grad
        state.pending[t] -= 1
        done = state.pending[t] == 0
        inputs = ([leaf] if wants_input else []) + params
        # backward(inputs=...) accumulates into .grad in place and computes only what `inputs`
        # need: a pass-through block costs one input-gradient product, no weight gradient.
        # Nothing to compute (the stream ends on a block with no trainable parameter): skip.
        if inputs:
            cotangent = cotangent.to(out.dtype)  # a mixed-precision state may be narrower
            torch.autograd.backward(out, cotangent, inputs=inputs, retain_graph=not done)
        if done:
            del state.inputs[t], state.outputs[t], state.pending[t]
        if not wants_input:
            return None
        grad, leaf.grad = leaf.grad, None
        return grad

    def _passed(self, state: _Microbatch, t: int) -> None:
        """One more stream is done with block t; the last one frees its graph."""
        state.pending[t] -= 1
        if state.pending[t] == 0:
            del state.inputs[t], state.outputs[t], state.pending[t]

    def _release(self, microbatch: int, state: _Microbatch) -> None:
        if state.forwarded and not state.outputs:
            del self._microbatches[microbatch]

    # ------------------------------------------------------------------ helpers

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without graphs: x(last), or the logits if the run ends the network."""
        with self.compute.autocast():
            for t in range(self.first, self.last):
                x = self.compute.state(self.model.block_forward(t, x))
            return self.model.head(x) if self.last == self.plan.num_blocks else x

    @property
    def outstanding(self) -> int:
        """Microbatches whose graphs are still held (some stream has not passed yet)."""
        return len(self._microbatches)
