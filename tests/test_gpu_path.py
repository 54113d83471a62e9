"""What the CUDA/NCCL path needs that can be checked on CPU: the fp16 loss scale shared by
sharded replicas, the loss factor read from the scale, the gradient norm of a stage without
gradients, the RNG state in checkpoints, TF32, the rules' noise drawn on the device."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from processes import run

from mpc_dist.config import ModelConfig, OptimConfig
from mpc_dist.core import ComputeOptions, EngineOptions, Plan
from mpc_dist.models import build_model
from mpc_dist.parallel import Groups, RuntimeOptions, ScheduleSpec, Topology, stage_ranges
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
        stage = build_stage(
            model=build_model(SPEC, SHAPE, 5, device="meta"),
            plan=Plan("receding", 2, 4),
            ranges=stage_ranges([per_stage] * stages),
            groups=groups,
            optim=OptimConfig("sgd", lr=0.05),
            runtime=RuntimeOptions(schedule=ScheduleSpec(2)),
            compute=FP16,
            spec=SPEC,
            seed=0,
            sharding="fsdp",
        )
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


def frozen_front(model):
    """``model`` with its stem and blocks 0 and 1 frozen (stage 0 of two has nothing to train)."""
    for p in [*model.stem.parameters(), *model.block_parameters(0), *model.block_parameters(1)]:
        p.requires_grad_(False)
    return model


def check_frozen_stage(rank: int, world: int) -> None:
    """A sync P = 2 pipeline whose first stage has no trainable parameter steps, and the second
    stage's weights equal one process's with the same blocks frozen."""
    from mpc_dist.core import HorizonEngine
    from mpc_dist.train import build_optimizer

    spec = ModelConfig(name="residual_mlp", num_blocks=4, width=8, hidden=12, head="shared")
    plan, optim, m = Plan("receding", 4, 4), OptimConfig("sgd", lr=0.05, momentum=0.9), 2
    g = torch.Generator().manual_seed(5)
    data = [
        (
            torch.randn(8, *SHAPE, dtype=torch.float64, generator=g),
            torch.randint(0, 5, (8,), generator=g),
        )
        for _ in range(3)
    ]
    single = frozen_front(build_model(spec, SHAPE, 5, seed=0).double())
    engine = HorizonEngine(single, plan, EngineOptions(track_memory=False))
    optimizer = build_optimizer(optim, single.parameters())
    for x, y in data:
        for xs, ys in zip(x.chunk(m), y.chunk(m), strict=True):
            engine.train_microbatch(xs, ys, loss_scale=1 / m)
        optimizer.step()
        optimizer.zero_grad()
    groups = Groups.create(Topology(2, 1, rank))
    options = RuntimeOptions(schedule=ScheduleSpec(m), dtype=torch.float64)
    meta = frozen_front(build_model(spec, SHAPE, 5, device="meta"))
    stage = build_stage(
        model=meta,
        plan=plan,
        ranges=stage_ranges([2, 2]),
        groups=groups,
        optim=optim,
        runtime=options,
        spec=spec,
    )
    assert bool(stage.runtime.step.params) == (rank == 1)
    for batch in data:
        stage.runtime.run([batch], [optim.lr])
    expected = dict(single.named_parameters())
    for name, p in stage.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-12, msg=name)


def test_a_stage_without_trainable_parameters_steps_in_a_sync_pipeline():
    run(check_frozen_stage, 2, timeout=120)


def test_the_norm_of_a_stage_without_gradients_is_on_its_device():
    from mpc_dist.train import OptimizerStep, build_optimizer

    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    optimizer = build_optimizer(OptimConfig("adamw"), frozen.parameters())
    meta = torch.device("meta")  # stands in for a CUDA device: anything but the CPU
    assert OptimizerStep(optimizer, device=meta).grad_norm().device == meta
    linear = torch.nn.Linear(2, 2, device=meta)
    step = OptimizerStep(build_optimizer(OptimConfig("sgd"), linear.parameters()))
    assert step.device == meta and step.grad_norm().device == meta  # default: the parameters'


def test_checkpoints_hold_the_rng_state_and_old_ones_still_load(tmp_path):
    from mpc_dist.train import Checkpointer, build_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Linear(3, 2, device=device)
    optimizer = build_optimizer(OptimConfig("adamw"), model.parameters())
    checkpointer = Checkpointer(tmp_path)
    torch.manual_seed(11)
    path = checkpointer.save(1, model, optimizer, {"step": 1})
    expected = torch.rand(4), torch.rand(4, device=device)
    saved = torch.load(path / "rng_rank0.pt")
    assert torch.is_tensor(saved["cpu"]) and saved["cpu"].dtype == torch.uint8
    if device == "cuda":  # the generator of the device the model is on, no other
        assert list(saved["cuda"]) == [torch.cuda.current_device()]
    else:
        assert set(saved) == {"cpu"}
    torch.rand(100), torch.rand(100, device=device)  # move the generators on
    assert checkpointer.load(path, model, optimizer) == {"step": 1}
    assert torch.equal(torch.rand(4), expected[0])
    assert torch.equal(torch.rand(4, device=device), expected[1])
    # older checkpoints hold the CPU state alone, as a bare tensor
    torch.save(saved["cpu"], path / "rng_rank0.pt")
    manifest = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.suffix != ".json"}
    manifest["trainer.json"] = (path / "trainer.json").stat().st_size
    (path / "manifest.json").write_text(json.dumps(manifest))
    torch.rand(100)
    checkpointer.load(path, model, optimizer)
    assert torch.equal(torch.rand(4), expected[0])


def test_a_frozen_stage_is_checkpointed_without_optimizer_state(tmp_path):
    from mpc_dist.train import Checkpointer, build_optimizer

    model = torch.nn.Linear(3, 2).requires_grad_(False)
    optimizer = build_optimizer(OptimConfig("adamw"), model.parameters())
    checkpointer = Checkpointer(tmp_path)
    path = checkpointer.save(1, model, optimizer, {"step": 1})
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    checkpointer.load(path, model, optimizer)
    assert torch.equal(model.weight, before)


def test_the_loss_factor_is_the_share_times_the_loss_scale_read_on_its_device():
    from mpc_dist.rules.common import loss_factor
    from mpc_dist.train.precision import grad_scaler

    scaler = grad_scaler(FP16, torch.device("cpu"))
    scaler.scale(torch.zeros(()))
    assert loss_factor(scaler.scale, 0.25, torch.device("cpu")) == 0.25 * scaler.get_scale()
    assert loss_factor(None, 0.25, torch.device("cpu")) == 0.25
    seen = []

    def scale_loss(share: torch.Tensor) -> torch.Tensor:
        seen.append(share.device)
        return torch.tensor(3.0)

    meta = torch.device("meta")  # stands in for the CUDA device the scale is on
    assert loss_factor(scale_loss, 0.25, meta) == 3.0 and seen == [meta]


def test_rule_noise_on_the_cpu_is_drawn_from_the_generator_itself():
    """On the CPU the rules draw from ``draws()`` exactly as before (the references of
    tests/test_rules.py check the numbers); on CUDA a generator there with the same seed."""
    from mpc_dist.rules.common import draws, on_device

    generator = draws(0, 2, 1)
    assert on_device(generator, torch.device("cpu")) is generator
    expected = torch.randn(5, generator=draws(0, 2, 1)).to("cpu")  # the old: drawn, then moved
    assert torch.equal(torch.randn(5, generator=generator, device="cpu"), expected)
    if torch.cuda.is_available():
        cuda = on_device(draws(0, 2, 1), torch.device("cuda"))
        assert cuda.device.type == "cuda" and cuda.initial_seed() == generator.initial_seed()


def test_tf32_is_switched_for_cuda_only_and_can_be_turned_off():
    from mpc_dist.config import load_config
    from mpc_dist.train.precision import configure_tf32

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        assert load_config(None).train.tf32  # on by default
        assert not configure_tf32(True, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"  # the CPU's matmuls untouched
        assert configure_tf32(True, torch.device("cuda", 0))  # flags only: no GPU needed
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not configure_tf32(False, torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def check_bf16_fsdp_parameters(rank: int, world: int) -> None:
    """pipeline.fsdp_param_dtype=bfloat16: blocks compute with bf16 gathered parameters, the
    optimizer keeps float32 shards, and 3 SGD steps land near the float32-parameter run."""
    groups = Groups.create(Topology(1, world, rank))
    options = RuntimeOptions(schedule=ScheduleSpec(2))
    results = {}
    for param_dtype in (None, torch.bfloat16):
        stage = build_stage(
            model=build_model(SPEC, SHAPE, 5, device="meta"),
            plan=Plan("receding", 2, 4),
            ranges=stage_ranges([4]),
            groups=groups,
            optim=OptimConfig("sgd", lr=0.05),
            runtime=options,
            compute=ComputeOptions(autocast_dtype=torch.bfloat16),
            spec=SPEC,
            seed=0,
            sharding="fsdp",
            fsdp_param_dtype=param_dtype,
        )
        initial = {k: v.full_tensor() for k, v in stage.model.named_parameters()}
        seen = []
        block = stage.model.blocks["1"]
        block.register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(next(m.parameters()).dtype)
        )
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            x = torch.randn(8, *SHAPE, generator=g)
            stage.runtime.run([(x, torch.randint(0, 5, (8,), generator=g))], [0.05])
        assert set(seen) == {param_dtype or torch.float32}, seen
        shards = [p for group in stage.optimizer.param_groups for p in group["params"]]
        assert all(p.dtype == torch.float32 and hasattr(p, "full_tensor") for p in shards)
        results[param_dtype] = {k: v.full_tensor() for k, v in stage.model.named_parameters()}
    moved = max((results[None][k] - initial[k]).abs().max() for k in initial)
    worst = max((results[torch.bfloat16][k] - results[None][k]).abs().max() for k in initial)
    assert worst < 0.1 * moved, (float(worst), float(moved))  # measured: 1.0e-3 vs 6.9e-2


def test_fsdp_gathers_bf16_parameters_and_keeps_float32_shards():
    run(check_bf16_fsdp_parameters, 2, timeout=200)


def test_fsdp_param_groups_of_older_and_newer_torch():
    from types import SimpleNamespace

    from mpc_dist.parallel.fsdp import param_groups

    a, b = object(), object()
    assert param_groups(SimpleNamespace(_fsdp_param_groups=[a, b])) == [a, b]  # torch >= 2.12
    assert param_groups(SimpleNamespace(_fsdp_param_group=a)) == [a]  # torch < 2.12
    assert param_groups(SimpleNamespace(_fsdp_param_group=None)) == []  # a unit with no params


def test_bf16_fsdp_parameters_need_fsdp_and_bf16_mixed():
    import pytest

    from mpc_dist.config import ConfigError, load_config
    from mpc_dist.train import validate_config as validate

    base = ["pipeline.stages=1", "pipeline.replicas=2", "pipeline.sharding=fsdp",
            "train.precision=bf16-mixed"]  # fmt: skip
    validate(load_config(None, [*base, "pipeline.fsdp_param_dtype=bfloat16"]))
    for bad in (
        ["pipeline.sharding=none"],
        ["train.precision=fp32"],
        ["pipeline.fsdp_param_dtype=fp8"],
    ):
        overrides = [*base, "pipeline.fsdp_param_dtype=bfloat16", *bad]
        with pytest.raises(ConfigError, match="pipeline.fsdp_param_dtype"):
            validate(load_config(None, overrides))
