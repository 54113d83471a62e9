"""Mixed precision, activation checkpointing and frozen blocks in the engine and the pipeline."""

from __future__ import annotations

import pytest
import torch
from helpers import engine_grads as gradients
from helpers import make_batch, make_model
from processes import run

from mpc_dist.config import ModelConfig, OptimConfig, load_config
from mpc_dist.core import ComputeOptions, EngineOptions, HorizonEngine, Plan
from mpc_dist.models import build_model
from mpc_dist.parallel import Groups, RuntimeOptions, ScheduleSpec, Topology, stage_ranges
from mpc_dist.train import OptimizerStep, build_optimizer, build_stage, train
from mpc_dist.train.precision import grad_scaler

PLAIN, CHECKPOINTED = ComputeOptions(), ComputeOptions(checkpoint_blocks=True)


def engine_grads(model, plan, x, y, compute=PLAIN):
    engine = HorizonEngine(model, plan, EngineOptions(compute=compute))
    return gradients(model, engine, x, y), engine.memory.peak_bytes


def test_activation_checkpointing_gives_the_same_gradients_with_fewer_saved_bytes():
    for name in ("residual_mlp", "vit_tiny"):
        model = make_model(name)
        x, y = make_batch()
        T = model.num_blocks
        for rule in ("receding", "shrinking"):
            for h in range(1, T + 1):
                plan = Plan(rule, h, T)
                plain, plain_bytes = engine_grads(model, plan, x, y)
                checked, checked_bytes = engine_grads(model, plan, x, y, CHECKPOINTED)
                assert plain.keys() == checked.keys()
                for key in plain:  # float64: the recomputation is the same computation
                    torch.testing.assert_close(checked[key], plain[key], rtol=0, atol=0)
                assert checked_bytes < plain_bytes, (name, rule, h, checked_bytes, plain_bytes)


def test_bf16_states_between_blocks_and_gradients_close_to_fp32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_blocks=4, width=32, hidden=64), (1, 8, 8), 10)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    plan = Plan("receding", 2, 4)
    full, _ = engine_grads(model, plan, x, y)
    bf16 = ComputeOptions(autocast_dtype=torch.bfloat16)
    engine = HorizonEngine(model, plan, EngineOptions(compute=bf16))
    result = engine.forward(0, x, y, eager=False)
    assert result.logits.dtype == torch.bfloat16
    mixed, _ = engine_grads(model, plan, x, y, bf16)
    for key in full:  # master gradients stay float32; bf16 compute costs ~1% here
        assert mixed[key].dtype == torch.float32
        error = (mixed[key] - full[key]).norm() / full[key].norm()
        assert error < 0.05, (key, float(error))


def test_blocks_without_trainable_parameters():
    """Frozen blocks: a stream may end on one (nothing to compute there) or pass through it."""
    model = make_model("residual_mlp")
    for t in (0, 2, 3):
        for p in model.block_parameters(t):
            p.requires_grad_(False)
    x, y = make_batch()
    for h in (1, 2, model.num_blocks):
        got, _ = engine_grads(model, Plan("receding", h, model.num_blocks), x, y)
        assert not any(k.startswith(("blocks.0.", "blocks.2.", "blocks.3.", "stem.")) for k in got)
        assert any(k.startswith("blocks.1.") for k in got)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(OptimConfig("sgd", lr=0.1), model.parameters())
    scaler = grad_scaler(ComputeOptions(autocast_dtype=torch.float16), torch.device("cpu"))
    step = OptimizerStep(optimizer, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    step(torch.tensor(1.0), 0.1)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() < scale
    model.weight.grad = torch.ones_like(model.weight)
    step(torch.tensor(1.0), 0.1)
    assert not torch.equal(model.weight, before[0])


def check_mixed_pipeline(rank: int, world: int, precision: torch.dtype) -> None:
    """P = 2 in bf16 / fp16 (with its shared loss scale) equals one process with the same
    compute: the same casts at block boundaries, bf16 messages between the stages."""
    groups = Groups.create(Topology(2, 1, rank))
    compute = ComputeOptions(autocast_dtype=precision)
    plan, m, T = Plan("receding", 2, 4), 2, 4
    spec = ModelConfig(num_blocks=T, width=16, hidden=24, head="shared")
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g))
        for _ in range(3)
    ]
    optim = OptimConfig("adam", lr=0.01)
    torch.manual_seed(0)
    single = build_model(spec, (1, 6, 6), 5)
    optimizer = build_optimizer(optim, single.parameters())
    step = OptimizerStep(optimizer, scaler=grad_scaler(compute, torch.device("cpu")))
    engine = HorizonEngine(single, plan, EngineOptions(compute=compute, scale_loss=step.scale_loss))
    for x, y in data:
        loss = sum(
            r.losses[T]
            for r in (
                engine.train_microbatch(xs, ys, 1 / m)
                for xs, ys in zip(x.chunk(m), y.chunk(m), strict=True)
            )
        )
        step(loss, 0.01)
    torch.manual_seed(0)
    options = RuntimeOptions(schedule=ScheduleSpec(m, "sync"))
    ranges = stage_ranges([2, 2])
    model = build_model(spec, (1, 6, 6), 5)
    stage = build_stage(
        model=model,
        plan=plan,
        ranges=ranges,
        groups=groups,
        optim=optim,
        runtime=options,
        compute=compute,
    )
    for x, y in data:
        stage.runtime.run([(x, y)], [0.01])
    expected = dict(single.named_parameters())
    for name, p in stage.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_pipeline_equals_one_process():
    run(check_mixed_pipeline, 2, torch.bfloat16, timeout=200)


def test_fp16_pipeline_with_a_shared_loss_scale_equals_one_process():
    run(check_mixed_pipeline, 2, torch.float16, timeout=200)


@pytest.mark.slow
def test_quickstart_in_bf16_mixed_precision_trains_as_fp32_does(tmp_path):
    """40 steps of the quickstart (warm-up 10) in bf16-mixed and in fp32: bf16 reaches what fp32
    reaches, within a point (measured 2026-11-27: 88.31% against 88.22%; 3 epochs: 98.30%
    against 98.31%). bf16 matmuls on a CPU without bf16 instructions take 1.3 s a step."""
    accuracy = {}
    for precision in ("bf16-mixed", "fp32"):
        config = load_config(
            "configs/quickstart.yaml",
            [
                f"train.precision={precision}",
                "train.epochs=1",
                "train.max_steps=40",
                "optim.warmup_steps=10",
                f"run.out_dir={tmp_path}",
                f"run.name={precision}",
                "run.progress=false",
                "run.tensorboard=false",
                "run.plot=false",
                "run.keep_checkpoints=1",
            ],
        )
        accuracy[precision] = train(config)["test accuracy"]
    assert accuracy["fp32"] >= 0.85 and accuracy["bf16-mixed"] >= accuracy["fp32"] - 0.01, accuracy
