"""What the CUDA/NCCL path needs that can be checked on CPU: the fp16 loss scale shared by
sharded replicas, the loss factor read from the scale, the gradient norm of a stage without
gradients, the RNG state in checkpoints, TF32, the rules' noise drawn on the device."""

from __future__ import annotations

import torch
import torch.distributed as dist
from multiprocess import run

from mpc_dist.config import ModelConfig, OptimConfig
from mpc_dist.core import ComputeOptions, Plan
from mpc_dist.models import build_model
from mpc_dist.parallel import Groups, RuntimeOptions, Topology, stage_ranges
from mpc_dist.train import build_stage

SHAPE = (1, 6, 6)
SPEC = ModelConfig(name="residual_mlp", num_blocks=4, width=8, hidden=12, head="aux")
FP16 = ComputeOptions(autocast_dtype=torch.float16)


def check_overflow_on_one_shard(rank: int, world: int) -> None:
    """fp16 + FSDP, P = 2 x D = 2 and P = 1 x D = 4: an inf in one replica's gradient shard
    lowers every rank's loss scale and skips the step everywhere; later steps keep the scales
    equal. The scale is shared over the whole job, resp. the stage's replicas."""
    for stages in (2, 1):
        groups = Groups.create(Topology(stages, world // stages, rank))
        per_stage = SPEC.num_blocks // stages
        options = RuntimeOptions(2, "sync", compute=FP16)
        stage = build_stage(build_model(SPEC, SHAPE, 5, device="meta"), Plan("receding", 2, 4),
                            stage_ranges([per_stage] * stages), groups,
                            OptimConfig("sgd", lr=0.05), options, spec=SPEC, seed=0,
                            sharding="fsdp")  # fmt: skip
        step = stage.runtime.step
        shared = dist.group.WORLD if stages > 1 else groups.data_parallel
        assert step.scaler.process_group is shared, stages
        reduce, poison = step.reduce_gradients, [True]

        def reduce_then_poison(reduce=reduce, poison=poison, stage=stage, groups=groups) -> None:
            reduce()
            topology = groups.topology
            if poison[0] and topology.replica == 0 and topology.stage == 0:
                grad = next(p.grad for p in stage.model.parameters() if p.grad is not None)
                grad.to_local().view(-1)[0] = float("inf")  # this replica's shard only

        step.reduce_gradients = reduce_then_poison
        before = {k: v.full_tensor().clone() for k, v in stage.model.named_parameters()}
        initial = step.scaler.get_scale()
        g = torch.Generator().manual_seed(3)
        for index in range(3):
            poison[0] = index == 0
            x = torch.randn(8, *SHAPE, generator=g)
            stage.runtime.run([(x, torch.randint(0, 5, (8,), generator=g))], [0.05])
            scales: list = [None] * world
            dist.all_gather_object(scales, step.scaler.get_scale())
            assert len(set(scales)) == 1, (stages, index, scales)
            if index == 0:
                assert scales[0] < initial, (stages, scales, initial)
                for name, p in stage.model.named_parameters():  # skipped everywhere
                    torch.testing.assert_close(p.full_tensor(), before[name], rtol=0, atol=0)
        dist.barrier()


def test_fp16_sharded_replicas_share_one_loss_scale():
    run(check_overflow_on_one_shard, 4, timeout=240)
