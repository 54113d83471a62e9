"""A model of your own as a pipeline model, as the README shows it (model.name: own_model:build)."""

import math

from torch import nn

from mpc_dist.models import pipeline_model


def build(spec, input_shape, num_classes):
    width = spec.width
    stem = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width))
    blocks = [
        nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh())
        for _ in range(spec.num_blocks)
    ]
    head = nn.Linear(width, num_classes)
    return pipeline_model(
        stem,
        blocks,
        head,
        input_shape,
        head_mode=spec.head,
        aux_head=lambda shape: nn.Linear(shape[0], num_classes),
    )
