"""FSDP2 over a stage's data-parallel replicas (``pipeline.sharding: fsdp``).

The horizon engine runs backward stream by stream on each block's retained graph: several
backward calls per block and microbatch, some asking for weight gradients only. So parameters
stay unsharded from the forward until the optimizer step, and gradients are reduce-scattered
once, just before the step: the recipe ``torch.distributed.pipelining`` uses for FSDP. It needs
FSDP2's private state (lazy initialisation without a root forward, the param groups'
post-backward); this module is the one place that touches it, and ``tests/test_sharding.py``
checks it against unsharded training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..models import BlockModel


def shard_stage(part: BlockModel, group: dist.ProcessGroup, device: torch.device) -> None:
    """Shard the stem, every block and every head of ``part`` (then the rest) over ``group``."""
    mesh = DeviceMesh.from_group(group, device.type)
    units: list[nn.Module] = [*part.blocks.values(), *part.aux_heads.values()]
    units += [m for m in (part.stem, part.head) if m is not None]
    for module in units:
        fully_shard(module, mesh=mesh, reshard_after_forward=False)
    fully_shard(part, mesh=mesh, reshard_after_forward=False)
    for module in part.modules():  # sum, not average: the loss is already scaled by 1/(m D)
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    part.set_requires_gradient_sync(False)
    part.set_reshard_after_backward(False)
    # Private: FSDP2 finds its root in the first root forward, and the engine calls blocks,
    # never the root module.
    fully_shard.state(part)._lazy_init()


def reduce_gradients(part: BlockModel) -> None:
    """Reduce-scatter the gradients accumulated since the last step into the sharded ``.grad``s
    and reshard the parameters (torch.distributed.pipelining's ``perform_reduce_grad``)."""
    part.set_is_last_backward(True)
    part.set_requires_gradient_sync(True)
    part.set_reshard_after_backward(True)
    state = fully_shard.state(part)
    for module_state in state._state_ctx.all_states:  # private: no public post-backward call
        for param_group in module_state._fsdp_param_groups:
            param_group.post_backward()
    state._root_post_backward_final_callback()
    part.set_requires_gradient_sync(False)
    part.set_reshard_after_backward(False)
