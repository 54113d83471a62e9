"""Forward-forward (Hinton 2022): each block raises the goodness (sum of squared activities) of
positive data (the image with its true label written into the first pixels) above a threshold
and lowers that of negative data (a wrong label). Block inputs are length-normalised, so a block
cannot read its predecessor's goodness. Predict by the goodness accumulated over the blocks for
every label, or, in one pass, by a linear readout of the last block's normalised activity of the
image with a neutral label (trained on its own loss, never into the blocks).

Following loeweX/Forward-Forward (which matches Hinton's matlab code): goodness = sum of squares
with threshold = number of units, the logistic loss averaged over positive and negative data
together, the input normalised too, a neutral label of 1/K in every label pixel. Optional, as
both codes have them: peer normalisation (each unit's running mean activity on positive data,
momentum 0.9, is pulled towards its layer's mean; Hinton's ``lambdamean``), with the gradient
passed straight through the ReLU where it is off (loeweX's ``ReLU_full_grad``), and the
readout's gradient scaled (loeweX trains it at 10x the blocks' learning rate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError, RulesConfig
from ..models import BlockModel
from .common import accumulate, block_and_head_parameters, hooked, normalise_length, on_device
from .local import LocalStep

PEER_MOMENTUM = 0.9  # of the running mean activity (both codes)
PEER_START = 0.5  # the running means' first value (both codes)


class ForwardForward:
    name = "ff"
    samples_per_input = 3  # positive, negative, neutral

    def __init__(self, num_classes: int, options: RulesConfig | None = None) -> None:
        self.num_classes = num_classes
        self.options = options or RulesConfig()
        self.running: dict[int, torch.Tensor] = {}  # block -> running mean activity per unit

    def with_labels(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """x with one-hot ``labels`` (None: the neutral 1/K) in its first K values."""
        flat = x.reshape(len(x), -1).clone()
        K = self.num_classes
        if labels is None:
            flat[:, :K] = 1.0 / K
        else:
            flat[:, :K] = F.one_hot(labels, K).to(flat.dtype)
        return flat.reshape(x.shape)

    def inputs(self, x, y, generator):
        generator = on_device(generator, y.device)
        offset = torch.randint(1, self.num_classes, y.shape, generator=generator, device=y.device)
        wrong = (y + offset) % self.num_classes
        return torch.cat(
            [self.with_labels(x, y), self.with_labels(x, wrong), self.with_labels(x, None)]
        )

    def infer_inputs(self, x):
        return self.with_labels(x, None)

    def block_input(self, t, x):
        return normalise_length(x)

    @staticmethod
    def goodness(out: torch.Tensor) -> torch.Tensor:
        return out.flatten(1).square().sum(dim=1)

    def step(self, model: BlockModel, t, x, y, generator, forward) -> LocalStep:
        inputs = self.block_input(t, x)
        pre: list[torch.Tensor] = []
        peer = self.options.ff_peer_normalisation > 0 and self.options.ff_straight_through
        # the straight-through peer loss reads the ReLUs' inputs through hooks: that pass runs
        # the block itself (a compiled or recomputed block would skip or repeat the hooks)
        run = model.block_forward if peer else forward
        with hooked(relu_inputs(model, t) if peer else [], lambda m, i, o: pre.append(o)):
            positive, negative = run(t, inputs[: 2 * len(y)]).chunk(2)
        with torch.no_grad():  # the neutral pass trains the readout only
            neutral = model.block_forward(t, inputs[2 * len(y) :])
        threshold = positive[0].numel()
        logits = torch.cat([self.goodness(positive), self.goodness(negative)]) - threshold
        labels = torch.cat([torch.ones_like(logits[: len(y)]), torch.zeros_like(logits[len(y) :])])
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        if self.options.ff_peer_normalisation > 0:
            active = positive if not pre else straight_through(pre[0].chunk(2)[0], positive)
            loss = loss + self.options.ff_peer_normalisation * self.peer_loss(t, active)
        block_params = block_and_head_parameters(model, t)
        readout, head_params = None, []
        if t + 1 == model.num_blocks:  # the readout: its own loss, on the neutral pass
            logits = self.predict(model, neutral)
            readout = F.cross_entropy(logits, y)
            head_params = [p for p in model.head.parameters() if p.requires_grad]
            block_params = [p for p in block_params if all(p is not h for h in head_params)]
        scale = self.options.ff_readout_lr_scale

        def update(factor: float) -> None:
            accumulate(loss, block_params, factor)
            if readout is not None:
                accumulate(readout, head_params, factor * scale)

        total = loss if readout is None else loss + readout
        out = torch.cat([positive, negative, neutral])
        return LocalStep(out, total, None if readout is None else logits, update)

    def peer_loss(self, t: int, active: torch.Tensor) -> torch.Tensor:
        """(layer mean - unit mean)^2 averaged over units, the unit means running over steps."""
        mean = active.flatten(1).mean(0)
        previous = self.running.get(t)
        if previous is None:
            previous = torch.full_like(mean, PEER_START).detach()
        running = PEER_MOMENTUM * previous + (1 - PEER_MOMENTUM) * mean
        self.running[t] = running.detach()
        return (running.mean() - running).square().mean()

    def predict(self, model, state):
        return model.head(normalise_length(state))


def relu_inputs(model: BlockModel, t: int) -> list[torch.nn.Module]:
    """The module whose output block t's last ReLU takes (for the straight-through gradient)."""
    block = model.blocks[str(t)]
    children = list(block) if isinstance(block, torch.nn.Sequential) else []
    if len(children) < 2 or not isinstance(children[-1], torch.nn.ReLU):
        raise ConfigError(
            f"rules.ff_straight_through=true: block {t} does not end in a ReLU; use "
            "model.name=relu_mlp or rules.ff_straight_through=false"
        )
    return [children[-2]]


def straight_through(pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out's value with the identity's gradient to ``pre``: the ReLU passes every gradient."""
    return pre + (out - pre).detach()


@torch.no_grad()
def predict_by_goodness(model: BlockModel, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hinton's prediction: the label whose image gathers the most goodness over the blocks
    (the first block left out when there are several); a whole model, one process."""
    rule = ForwardForward(num_classes)
    scores = []
    for label in range(num_classes):
        state = rule.with_labels(x, torch.full((len(x),), label, device=x.device))
        total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for t in range(model.num_blocks):
            state = model.block_forward(t, rule.block_input(t, state))
            if t > 0 or model.num_blocks == 1:
                total += rule.goodness(state).double()
        scores.append(total)
    return torch.stack(scores, dim=1)
