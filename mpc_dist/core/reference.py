"""The reference definition of horizon gradients (spec section 2): slow, obviously right.

For each block t: take x(t) detached, run blocks t .. s-1 where s is the loss point of the stream
that trains t, evaluate l_s, and differentiate it with respect to block t's parameters only.
Heads: the final head is trained by l_T, an aux head by its own loss; a shared head at s < T
gets nothing from l_s. Tests compare the engine against this; the horizon chooser uses it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import BlockModel
from .plan import Plan


def reference_gradients(
    model: BlockModel,
    plan: Plan,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    criterion=F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """Gradient of every trainable parameter (by name) under ``plan`` for one batch."""
    with torch.no_grad():
        states = [inputs]
        for t in range(plan.num_blocks):
            states.append(model.block_forward(t, states[-1]))
    grads: dict[int, torch.Tensor] = {}

    def add(params, loss) -> None:
        params = [p for p in params if p.requires_grad]
        for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
            if g is not None:
                grads[id(p)] = grads.get(id(p), 0) + g

    for t in range(plan.num_blocks):
        s = plan.trainer_of(t).loss_point
        x = states[t].detach()
        for k in range(t, s):
            x = model.block_forward(k, x)
        head, _ = model.loss_head(s)
        add(model.block_parameters(t), criterion(head(x), targets))
    for s in range(1, plan.num_blocks + 1):
        head, trainable = model.loss_head(s)
        if trainable and s in plan.loss_points:
            add(head.parameters(), criterion(head(states[s].detach()), targets))
    return {name: grads[id(p)] for name, p in model.named_parameters() if id(p) in grads}
