"""Forward gradient with local losses (Ren, Kornblith, Liao & Hinton 2022, LG-FG-A): every
block has its own loss (its aux head's cross-entropy, ``model.head: aux``), and the block's
weights learn from activity-perturbed forward gradients, with no backward pass through it.

For each linear layer l of block t, noise u_l ~ N(0, I) (independent per sample, masked where a
ReLU that follows is off) perturbs its output z_l. One forward-mode pass (``torch.func.jvp``)
gives each sample's directional derivative d = sum_l <dL/dz_l, u_l> of its local loss; the
estimate of dL/dz_l is d u_l, and of the weight gradient (d u_l)^T x_l with x_l the layer's
input: unbiased, and for activity perturbations about fan-in times less variance than weight
perturbations. Heads learn from their exact local gradient (the block's output detached).
Blocks may hold trainable parameters in ``nn.Linear`` layers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..models import BlockModel
from .common import accumulate, add_linear_grads, hooked, on_device
from .local import LocalStep, PlainRule


def linear_layers(model: BlockModel, t: int) -> list[nn.Linear]:
    """Block t's linear layers (its stem's too at t = 0); refuses other trainable parameters."""
    modules = [model.blocks[str(t)]] + ([model.stem] if t == 0 else [])
    linears = [m for root in modules for m in root.modules() if isinstance(m, nn.Linear)]
    covered = {id(p) for m in linears for p in m.parameters()}
    other = [p for root in modules for p in root.parameters()
             if p.requires_grad and id(p) not in covered]  # fmt: skip
    if other:
        raise ConfigError(
            f"horizon.rule=forward_gradient: block {t} has trainable parameters outside linear "
            f"layers (e.g. a norm's); use model.name=relu_mlp or another rule"
        )
    return linears


def relu_follows(model: BlockModel, t: int) -> set[int]:
    """ids of the linear layers whose output goes straight into a ReLU (in an nn.Sequential)."""
    found = set()
    for module in model.blocks[str(t)].modules():
        if isinstance(module, nn.Sequential):
            children = list(module)
            for a, b in zip(children, children[1:], strict=False):
                if isinstance(a, nn.Linear) and isinstance(b, nn.ReLU):
                    found.add(id(a))
    return found


class ForwardGradient(PlainRule):
    name = "forward_gradient"

    def step(self, model: BlockModel, t, x, y, generator) -> LocalStep:
        linears = linear_layers(model, t)
        head, _ = model.loss_head(t + 1)
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (input, output)

        def record(layer, inputs, output):
            seen[id(layer)] = (inputs[0].detach(), output.detach())

        with torch.no_grad(), hooked(linears, record):
            out = model.block_forward(t, x)
        masks = relu_follows(model, t)
        noise, generator = [], on_device(generator, out.device)
        for layer in linears:
            z = seen[id(layer)][1]
            u = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            noise.append(u * (z > 0) if id(layer) in masks else u)

        def local_losses(*perturbations: torch.Tensor) -> torch.Tensor:
            shifts = dict(zip(map(id, linears), perturbations, strict=True))
            with hooked(linears, lambda layer, i, o: o + shifts[id(layer)]):
                logits = head(model.block_forward(t, x))
            return F.cross_entropy(logits, y, reduction="none")

        zeros = tuple(torch.zeros_like(u) for u in noise)
        with torch.no_grad():  # forward mode only: nothing is kept for a backward pass
            _, directional = torch.func.jvp(local_losses, zeros, tuple(noise))
        logits = head(out)  # the head learns from its exact gradient; the block's output detached
        loss = F.cross_entropy(logits, y)
        head_params = [p for p in head.parameters() if p.requires_grad]

        def update(factor: float) -> None:
            weight = directional * (factor / len(y))  # the loss is the mean over the microbatch
            for layer, u in zip(linears, noise, strict=True):
                inputs = seen[id(layer)][0]
                add_linear_grads(layer, weight.view(-1, *[1] * (u.ndim - 1)) * u, inputs)
            accumulate(loss, head_params, factor)

        last = t + 1 == model.num_blocks
        kept = (*noise, *(inputs for inputs, _ in seen.values()))
        return LocalStep(out, loss, logits if last else None, update, kept)
