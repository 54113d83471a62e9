"""The optimizer step, written once: the single-process runner and every pipeline stage call it.

Before the step, gradients are summed over the stage's data-parallel replicas; the loss and the
gradient norm are checked (over the whole pipeline in sync mode), so a non-finite value never
reaches the weights; gradients are clipped with torch's own utilities against the global norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ..config import OptimConfig
from ..parallel import all_reduce_gradients
from .callbacks import Callback


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


def build_optimizer(
    config: OptimConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    optimizer = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(config: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warmup, then constant or cosine decay to zero over ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class OptimizerStep:
    """``step(loss, lr)``: reduce, check, clip, step, zero the gradients."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        grad_clip: float = 0.0,
        data_parallel: dist.ProcessGroup | None = None,
        norm_group: dist.ProcessGroup | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        """``data_parallel``: sum gradients over it first; ``norm_group``: the ranks whose
        gradients make up the global norm and share the non-finite check (sync pipeline)."""
        self.optimizer, self.grad_clip = optimizer, grad_clip
        self.data_parallel, self.norm_group = data_parallel, norm_group
        self.callbacks = list(callbacks)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.steps = 0

    def __call__(self, loss: torch.Tensor | float, lr: float) -> None:
        self.steps += 1
        for callback in self.callbacks:
            callback.before_step(self.steps)
        if self.data_parallel is not None:
            all_reduce_gradients(self.params, self.data_parallel)
        norm = self._checked_norm(torch.as_tensor(loss))
        if self.grad_clip > 0:
            clip_grads_with_norm_(self.params, self.grad_clip, norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _checked_norm(self, loss: torch.Tensor) -> torch.Tensor:
        """The global gradient norm; raises TrainingError (gradients dropped) if the loss or the
        norm is not finite anywhere in ``norm_group``."""
        norm = get_total_norm([p.grad for p in self.params if p.grad is not None])
        bad_loss = ~torch.isfinite(loss)
        if self.norm_group is not None:
            stats = torch.stack([norm.double().square(), bad_loss.double().to(norm.device)])
            dist.all_reduce(stats, group=self.norm_group)
            norm, bad_loss = stats[0].sqrt(), stats[1] > 0
        bad_loss, bad_norm = bool(bad_loss), not bool(torch.isfinite(norm))
        if bad_loss or bad_norm:
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if bad_loss else "gradient norm"
            local = "" if math.isfinite(float(loss)) else f" ({float(loss)})"
            raise TrainingError(f"non-finite {what}{local}")
        return norm
