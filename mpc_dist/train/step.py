"""The optimizer step, written once: the single-process runner and every pipeline stage call it.

Before the step, gradients are summed over the stage's data-parallel replicas (and unscaled,
with an fp16 loss scale); the loss and the gradient norm are checked (over the whole pipeline in
sync mode), so a non-finite value never reaches the weights; gradients are clipped with torch's
own utilities against the global norm. Under fp16 a non-finite norm is an overflow of the loss
scale: the step is skipped and the scale lowered, as torch's GradScaler does. Otherwise a
non-finite value stops training (``optim.on_nonfinite: stop``) or skips the step everywhere
(``skip``: every replica agrees, so the replicas stay identical).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ..config import OptimConfig
from .callbacks import Callback


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


def build_optimizer(
    config: OptimConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:  # a frozen stage: torch refuses an empty list, not an empty group
        params = [{"params": []}]
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    optimizer = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(config: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warmup, then constant, cosine decay to zero, constant then linear to zero over
    the second half (halfway_linear), or steps down by decay_factor at the fractions decay_at
    (step), over ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        passed = sum(step >= fraction * total_steps for fraction in config.decay_at)
        return config.lr * config.decay_factor**passed
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    if config.schedule == "halfway_linear":
        return config.lr * min(1.0, 2 * (1 - progress))
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


class OptimizerStep:
    """``step(loss, lr)``: reduce, check, clip, step, zero the gradients."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        grad_clip: float = 0.0,
        reduce_gradients: Callable[[], None] | None = None,
        norm_group: dist.ProcessGroup | None = None,
        callbacks: Sequence[Callback] = (),
        scaler: torch.amp.GradScaler | None = None,
        device: torch.device | None = None,
        on_nonfinite: str = "stop",
        replica_group: dist.ProcessGroup | None = None,
    ) -> None:
        """``reduce_gradients``: sums (or reduce-scatters) the gradients over the data-parallel
        replicas first; ``norm_group``: the ranks whose gradients make up the global norm and
        share the non-finite check (sync pipeline); ``scaler``: the fp16 loss scale;
        ``device``: the stage's (default: its parameters'), where the norm of a stage without
        gradients lives, as NCCL's all-reduce needs; ``on_nonfinite``: ``stop`` raises
        TrainingError, ``skip`` drops the step, agreed over ``replica_group`` (the stage's
        data-parallel replicas; after ``norm_group``'s check)."""
        self.optimizer, self.grad_clip = optimizer, grad_clip
        self.on_nonfinite, self.replica_group = on_nonfinite, replica_group
        self.skipped = 0
        self.reduce_gradients, self.norm_group = reduce_gradients, norm_group
        self.callbacks, self.scaler = list(callbacks), scaler
        self.scale_loss = scaler.scale if scaler is not None else None
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if device is None:
            device = self.params[0].device if self.params else torch.device("cpu")
        self.device = torch.device(device)
        if scaler is not None:  # a stage without a loss never scales one
            scaler.scale(torch.zeros((), device=self.device))
        self.steps = 0

    def __call__(self, loss: torch.Tensor | float, lr: float) -> None:
        self.steps += 1
        for callback in self.callbacks:
            callback.before_step(self.steps)
        if self.reduce_gradients is not None:
            self.reduce_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = self._checked_norm(torch.as_tensor(loss))
        if norm is None:  # fp16 overflow (a lower loss scale) or a non-finite value skipped
            if self.scaler is not None:
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            return
        if self.grad_clip > 0:
            clip_grads_with_norm_(self.params, self.grad_clip, norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> torch.Tensor:
        """This stage's gradient norm, on its device (over every shard under FSDP)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:  # get_total_norm([]) is a CPU tensor, which NCCL's all-reduce refuses
            return torch.zeros((), device=self.device)
        norm = get_total_norm(grads)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _checked_norm(self, loss: torch.Tensor) -> torch.Tensor | None:
        """The global gradient norm; raises TrainingError (gradients dropped) if the loss or the
        norm is not finite anywhere in ``norm_group`` (None for a non-finite norm under fp16)."""
        norm = self.grad_norm()
        bad_loss = ~torch.isfinite(loss)
        if self.norm_group is not None:
            stats = torch.stack([norm.double().square(), bad_loss.double().to(norm.device)])
            dist.all_reduce(stats, group=self.norm_group)
            norm, bad_loss = stats[0].sqrt(), stats[1] > 0
        bad_loss, bad_norm = bool(bad_loss), not bool(torch.isfinite(norm))
        if bad_norm and not bad_loss and self.scaler is not None:
            return None
        what = "loss" if bad_loss else "gradient norm" if bad_norm else None
        if self.on_nonfinite == "skip" and self.replica_group is not None:
            bad = torch.tensor(float(what is not None), device=norm.device)
            dist.all_reduce(bad, group=self.replica_group)  # a replica alone must not step
            if bad.item() and what is None:
                what = "loss or gradient norm on another replica"
        if what is None:
            return norm
        self.optimizer.zero_grad(set_to_none=True)
        if self.on_nonfinite == "skip":
            self.skipped += 1
            where = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
            print(
                f"mpc-dist: {where}optimizer step {self.steps} skipped: non-finite {what} "
                f"(optim.on_nonfinite=skip)",
                file=sys.stderr,
            )
            return None
        local = "" if math.isfinite(float(loss)) else f" ({float(loss)})"
        raise TrainingError(f"non-finite {what}{local}")
