"""Forward gradient with local losses (Ren, Kornblith, Liao & Hinton 2023, LG-FG-A): every
block has its own loss (its aux head's cross-entropy, ``model.head: aux``), and the block's
weights learn from activity-perturbed forward gradients, with no backward pass through it.

Noise u ~ N(0, I), independent per sample, perturbs the output z of every perturbation site of
block t. One forward-mode pass (``torch.func.jvp``) gives the directional derivatives g of the
block's local losses; the estimate of dL/dz is g u (masked where the ReLU that follows is off),
and of the weight gradient the layer's own vector-Jacobian product with it: unbiased, and for
activity perturbations about fan-in times less variance than weight perturbations. Heads learn
from their exact local gradient (the block's output detached).

Two kinds of blocks:

* plain ``nn.Linear`` layers (``relu_mlp``): the sites are the linear layers' outputs, the
  local loss is one per sample (its cross-entropy), ``g`` one scalar per sample;
* LocalMixer blocks (``local_mixer``): the sites are its ``Site`` modules' LayerNorm outputs,
  the losses are the paper's replicated ones, one per (sample, patch, group)
  (``LocalMixerHead.replicated_losses``), and a unit's estimate takes the directional
  derivative of the losses it feeds (``Site.spread``); its gradient goes back through the
  LayerNorm to the linear layer locally (the official code's ``norm_grad``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..models import BlockModel
from ..models.local_mixer import Site
from .common import accumulate, add_linear_grads, hooked, on_device
from .local import LocalStep, PlainRule


@dataclass
class Perturbed:
    """Where noise goes (``point``'s output) and how its estimate becomes weight gradients."""

    point: nn.Module  # its output is perturbed
    site: Site | None  # a LocalMixer site, else ``point`` is a plain nn.Linear
    relu: bool  # a ReLU takes the output (mask the estimate where it is off)

    def spread(self, g: torch.Tensor, ndim: int) -> torch.Tensor:
        """(B, P, G) directional derivatives -> a tensor that broadcasts to the output."""
        if self.site is not None:
            return self.site.spread(g)
        return g.sum((1, 2)).view(-1, *[1] * (ndim - 1))


def linear_layers(model: BlockModel, t: int) -> list[nn.Linear]:
    """Block t's nn.Linear layers (its stem's too at t = 0)."""
    modules = [model.blocks[str(t)]] + ([model.stem] if t == 0 else [])
    return [m for root in modules for m in root.modules() if isinstance(m, nn.Linear)]


def perturbations(model: BlockModel, t: int) -> list[Perturbed]:
    """Block t's perturbation sites; refuses trainable parameters that no site covers."""
    modules = [model.blocks[str(t)]] + ([model.stem] if t == 0 else [])
    sites = [m for root in modules for m in root.modules() if isinstance(m, Site)]
    if sites:
        found = [Perturbed(site.norm, site, True) for site in sites]
        covered = {id(p) for site in sites for p in site.parameters()}
    else:
        relus = relu_follows(model, t)
        found = [Perturbed(m, None, id(m) in relus) for m in linear_layers(model, t)]
        covered = {id(p) for item in found for p in item.point.parameters()}
    other = [
        p for root in modules for p in root.parameters() if p.requires_grad and id(p) not in covered
    ]
    if other:
        raise ConfigError(
            f"horizon.rule=forward_gradient: block {t} has trainable parameters outside linear "
            f"layers (e.g. a norm's); use model.name=relu_mlp or local_mixer, or another rule"
        )
    return found


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


def local_losses_of(head: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(state, targets) -> the block's local losses, (B, P, G): the head's replicated losses,
    or each sample's cross-entropy (P = G = 1)."""
    replicated = getattr(head, "replicated_losses", None)
    if replicated is not None:
        return replicated
    return lambda x, y: F.cross_entropy(head(x), y, reduction="none").view(-1, 1, 1)


class ForwardGradient(PlainRule):
    name = "forward_gradient"

    def step(self, model: BlockModel, t, x, y, generator, forward) -> LocalStep:
        # ``forward`` unused: the block runs without a graph (no checkpointing to apply)
        sites = perturbations(model, t)
        points = [item.point for item in sites]
        head, _ = model.loss_head(t + 1)
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (input, output)

        def record(module, inputs, output):
            seen[id(module)] = (inputs[0].detach(), output.detach())

        owners = [item.site or item.point for item in sites]  # what each update recomputes
        with torch.no_grad(), hooked(list({id(m): m for m in points + owners}.values()), record):
            out = model.block_forward(t, x)
        noise, generator = [], on_device(generator, out.device)
        for item, owner in zip(sites, owners, strict=True):
            z = seen[id(item.point)][1]
            u = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            if item.relu:  # the ReLU after the site (its output), or after the linear layer
                u = u * (seen[id(owner)][1] > 0)
            noise.append(u)
        inputs = [seen[id(owner)][0] for owner in owners]
        ndims = [seen[id(item.point)][1].ndim for item in sites]
        seen.clear()  # the outputs were needed for their shapes and masks only
        losses = local_losses_of(head)

        def local_losses(*perturbation: torch.Tensor) -> torch.Tensor:
            shifts = dict(zip(map(id, points), perturbation, strict=True))
            with hooked(points, lambda module, i, o: o + shifts[id(module)]):
                return losses(model.block_forward(t, x), y)

        zeros = tuple(torch.zeros_like(u) for u in noise)
        with torch.no_grad():  # forward mode only: nothing is kept for a backward pass
            _, directional = torch.func.jvp(local_losses, zeros, tuple(noise))
        logits = head(out)  # the head learns from its exact gradient; the block's output detached
        loss = F.cross_entropy(logits, y)
        head_params = [p for p in head.parameters() if p.requires_grad]

        def update(factor: float) -> None:
            g = directional * (factor / len(y))  # the loss is the mean over the microbatch
            for item, u, x_in, ndim in zip(sites, noise, inputs, ndims, strict=True):
                estimate = item.spread(g, ndim) * u
                if item.site is None:
                    add_linear_grads(item.point, estimate, x_in)
                else:  # back through the site's LayerNorm to its linear layer, locally
                    _site_update(item.site, x_in, estimate)
            accumulate(loss, head_params, factor)

        last = t + 1 == model.num_blocks
        return LocalStep(out, loss, logits if last else None, update, (*noise, *inputs))


def _site_update(site: Site, inputs: torch.Tensor, estimate: torch.Tensor) -> None:
    params = [p for p in site.linear.parameters() if p.requires_grad]
    if not params:
        return
    with torch.enable_grad():
        z = site.norm(site.linear(inputs))
        torch.autograd.backward(z, grad_tensors=estimate.to(z.dtype), inputs=params)
