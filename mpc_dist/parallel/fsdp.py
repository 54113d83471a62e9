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
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..models import BlockModel


def shard_stage(
    part: BlockModel,
    group: dist.ProcessGroup,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
) -> None:
    """Shard the stem, every block and every head of ``part`` (then the rest) over ``group``.
    ``param_dtype`` (e.g. bf16): the gathered parameters the blocks compute with, and the
    gradients they accumulate until the step, are in that dtype; the shards, the optimizer and
    the reduce-scatter stay in float32 (FSDP2's MixedPrecisionPolicy). None: all float32."""
    mesh = DeviceMesh.from_group(group, device.type)
    reduce_dtype = torch.float32 if param_dtype is not None else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    units: list[nn.Module] = [*part.blocks.values(), *part.aux_heads.values()]
    units += [m for m in (part.stem, part.head) if m is not None]
    for module in units:
        fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    fully_shard(part, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    for module in part.modules():  # sum, not average: the loss is already scaled by 1/(m D)
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    part.set_requires_gradient_sync(False)
    part.set_reshard_after_backward(False)
    # Private: FSDP2 finds its root in the first root forward, and the engine calls blocks,
    # never the root module.
    fully_shard.state(part)._lazy_init()
    if param_dtype is not None:
        # With a reduce dtype unlike the parameters', FSDP's post-backward (run at the end of
        # every backward call, for every unit) reads each unit's gathered parameter, which
        # exists once the unit has been gathered: gather and free each one now (the optimizer,
        # built next, must see the sharded parameters).
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
                module.reshard()


def reduce_gradients(part: BlockModel) -> None:
    """Reduce-scatter the gradients accumulated since the last step into the sharded ``.grad``s
    and reshard the parameters (torch.distributed.pipelining's ``perform_reduce_grad``)."""
    part.set_is_last_backward(True)
    part.set_requires_gradient_sync(True)
    part.set_reshard_after_backward(True)
    state = fully_shard.state(part)
    for module_state in state._state_ctx.all_states:  # private: no public post-backward call
        for param_group in param_groups(module_state):
            param_group.post_backward()
    state._root_post_backward_final_callback()
    part.set_requires_gradient_sync(False)
    part.set_reshard_after_backward(False)


def param_groups(state) -> list:
    """A module's FSDP param groups: a list since torch 2.12 (``_fsdp_param_groups``, for
    per-parameter meshes), before that one group or None (``_fsdp_param_group``)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]
