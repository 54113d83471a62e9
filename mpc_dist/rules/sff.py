"""Scalable forward-forward (Krutsylo 2025): back-propagation inside a block, none across.
Each block has a goodness head (a 1x1 convolution with one channel per class, the goodness of a
class is the mean square of its channel: ``model.head: goodness``), trained with all classes
competing (cross-entropy over the goodness values); the block's output is layer-normalised
before the next block sees it. Predict by the last block's goodness, or by the goodness averaged
over the blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import BlockModel
from .common import accumulate, block_and_head_parameters
from .local import LocalStep, PlainRule


class ScalableForwardForward(PlainRule):
    name = "sff"

    def block_input(self, t, x):
        return x if t == 0 else F.layer_norm(x, x.shape[1:])

    def step(self, model: BlockModel, t, x, y, generator, forward) -> LocalStep:
        out = forward(t, self.block_input(t, x))
        head, _ = model.loss_head(t + 1)
        goodness = head(out)
        loss = F.cross_entropy(goodness, y)
        logits = goodness if t + 1 == model.num_blocks else None
        params = block_and_head_parameters(model, t)
        return LocalStep(out, loss, logits, lambda factor: accumulate(loss, params, factor))


@torch.no_grad()
def predict_by_average(model: BlockModel, x: torch.Tensor) -> torch.Tensor:
    """Every block votes with its goodness vector; the votes averaged (a whole model)."""
    rule, votes = ScalableForwardForward(), 0
    for t in range(model.num_blocks):
        x = model.block_forward(t, rule.block_input(t, x))
        votes = votes + model.loss_head(t + 1)[0](x)
    return votes / model.num_blocks
