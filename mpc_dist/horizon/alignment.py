"""How well the horizon-h gradient points where back-propagation's does (spec section 7).

cos(theta_h) is the cosine between g_h, the stacked gradients of every block's parameters (the
controls u(t); the stem belongs to block 0, heads are not controls) under a plan, and g_T, the
back-propagation gradient, on the same batches and weights; per block too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import Criterion, EngineOptions, HorizonEngine, Plan
from ..models import BlockModel

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Alignment:
    rule: str
    horizon: int
    num_blocks: int
    cos: float  # stacked over all blocks
    block_cos: list[float]  # per block (nan where g_T has no weight gradient)

    @property
    def misalignment(self) -> float:
        """1 - cos^2(theta_h): the paper's quantity, 0 at back-propagation."""
        return max(0.0, 1.0 - self.cos**2)


def block_gradients(
    model: BlockModel, plan: Plan, batches: Sequence[Batch], criterion: Criterion = F.cross_entropy
) -> list[torch.Tensor]:
    """The flattened gradient of each block's parameters under ``plan``, summed over batches."""
    model.zero_grad(set_to_none=True)
    engine = HorizonEngine(model, plan, EngineOptions(track_memory=False, criterion=criterion))
    for x, y in batches:
        engine.train_microbatch(x, y, loss_scale=1.0 / len(batches))
    flat = []
    for t in range(model.num_blocks):
        params = [p for p in model.block_parameters(t) if p.requires_grad]
        flat.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                    for p in params
                ]
            )
        )
    model.zero_grad(set_to_none=True)
    return flat


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = a.norm() * b.norm()
    return float(a @ b / norm) if norm > 0 else float("nan")


def probe(
    model: BlockModel,
    batches: Sequence[Batch],
    horizons: Sequence[int],
    rules: Sequence[str] = ("receding", "shrinking"),
    criterion: Criterion = F.cross_entropy,
) -> list[Alignment]:
    """cos(theta_h) for every rule and horizon, against back-propagation on the same batches."""
    T = model.num_blocks
    reference = block_gradients(model, Plan("receding", T, T), batches, criterion)
    stacked = torch.cat(reference)
    rows = []
    for rule in rules:
        for h in horizons:
            if rule == "shrinking" and h in (1, T):  # the same plans as receding 1 and T
                continue
            got = block_gradients(model, Plan(rule, h, T), batches, criterion)
            per_block = [_cos(g, r) for g, r in zip(got, reference, strict=True)]
            rows.append(Alignment(rule, h, T, _cos(torch.cat(got), stacked), per_block))
    return rows
