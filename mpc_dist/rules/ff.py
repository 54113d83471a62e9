"""Forward-forward (Hinton 2022): each block raises the goodness (sum of squared activities) of
positive data (the image with its true label written into the first pixels) above a threshold
and lowers that of negative data (a wrong label). Block inputs are length-normalised, so a block
cannot read its predecessor's goodness. Predict by the goodness accumulated over the blocks for
every label, or, in one pass, by a linear readout of the last block's normalised activity of the
image with a neutral label (trained on its own loss, never into the blocks).

Following loeweX/Forward-Forward: goodness = sum of squares with threshold = number of units,
a logistic loss on positive and negative data, the input normalised too, and a neutral label of
1/K in every label pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import BlockModel
from .common import accumulate, block_and_head_parameters, normalise_length, on_device
from .local import LocalStep


class ForwardForward:
    name = "ff"
    samples_per_input = 3  # positive, negative, neutral

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

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
        return torch.cat([self.with_labels(x, y), self.with_labels(x, wrong),
                          self.with_labels(x, None)])  # fmt: skip

    def infer_inputs(self, x):
        return self.with_labels(x, None)

    def block_input(self, t, x):
        return normalise_length(x)

    @staticmethod
    def goodness(out: torch.Tensor) -> torch.Tensor:
        return out.flatten(1).square().sum(dim=1)

    def step(self, model: BlockModel, t, x, y, generator) -> LocalStep:
        out = model.block_forward(t, self.block_input(t, x))
        positive, negative, _ = out.chunk(3)
        threshold = positive[0].numel()
        loss = (F.softplus(threshold - self.goodness(positive)).mean()
                + F.softplus(self.goodness(negative) - threshold).mean())  # fmt: skip
        logits = None
        if t + 1 == model.num_blocks:  # the readout: its own loss, on the neutral pass
            logits = self.predict(model, out.chunk(3)[2].detach())
            loss = loss + F.cross_entropy(logits, y)
        params = block_and_head_parameters(model, t)
        return LocalStep(out, loss, logits, lambda factor: accumulate(loss, params, factor))

    def predict(self, model, state):
        return model.head(normalise_length(state))


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
