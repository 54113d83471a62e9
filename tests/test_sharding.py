"""Sharding inside a stage over its data-parallel replicas equals unsharded training (float64)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from launching import TINY, assert_same_weights, mpc_dist, sets, single_process_run
from processes import run

from mpc_dist.config import ModelConfig, OptimConfig
from mpc_dist.core import EngineOptions, HorizonEngine, Plan
from mpc_dist.models import build_model
from mpc_dist.parallel import Groups, RuntimeOptions, ScheduleSpec, Topology, stage_ranges
from mpc_dist.train import build_optimizer, build_stage

T, SHAPE = 4, (1, 6, 6)
SPEC = ModelConfig(name="residual_mlp", num_blocks=T, width=8, hidden=12, head="aux")
# SGD with momentum: Adam's normalisation would magnify float64 rounding (a different order of
# summation in the reductions) into 1e-9 differences after two steps. Clipping is checked in one
# run only: it would hide a wrong scale of the reduced gradients.
OPTIM = OptimConfig("sgd", lr=0.05, momentum=0.9)
CLIPPED = dataclasses.replace(OPTIM, grad_clip=0.5)


def data(steps: int = 3):
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(8, *SHAPE, dtype=torch.float64, generator=g),
            torch.randint(0, 5, (8,), generator=g),
        )
        for _ in range(steps)
    ]


def one_process(plan: Plan, m: int, optim: OptimConfig) -> dict[str, torch.Tensor]:
    model = build_model(SPEC, SHAPE, 5, seed=0).double()
    engine = HorizonEngine(model, plan, EngineOptions(track_memory=False))
    optimizer = build_optimizer(optim, model.parameters())
    for x, y in data():
        for xs, ys in zip(x.chunk(m), y.chunk(m), strict=True):
            engine.train_microbatch(xs, ys, loss_scale=1 / m)
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach() for k, v in model.named_parameters()}


def optimizer_state_numel(optimizer: torch.optim.Optimizer) -> int:
    local = [getattr(v, "_local_tensor", v) for s in optimizer.state.values() for v in s.values()]
    return sum(v.numel() for v in local if torch.is_tensor(v) and v.dim() > 0)


def check_sharded(rank: int, world: int, sharding: str) -> None:
    """P = 2 x D = 2, sync and async, h in {1, 2, 4}: after 3 clipped SGD steps the sharded
    stage holds the unsharded weights; its optimizer state is about 1/D of them."""
    groups = Groups.create(Topology(2, 2, rank))
    for mode, optim in (("sync", OPTIM), ("async", OPTIM), ("sync", CLIPPED)):
        for h in (1, 2, T):
            plan, m = Plan("receding", h, T), 2
            expected = one_process(plan, m * 2, optim)
            meta = build_model(SPEC, SHAPE, 5, device="meta")
            options = RuntimeOptions(schedule=ScheduleSpec(m, mode), dtype=torch.float64)
            stage = build_stage(
                model=meta,
                plan=plan,
                ranges=stage_ranges([2, 2]),
                groups=groups,
                optim=optim,
                runtime=options,
                spec=SPEC,
                seed=0,
                sharding=sharding,
            )
            batches = [
                (x[4 * groups.topology.replica :][:4], y[4 * groups.topology.replica :][:4])
                for x, y in data()
            ]
            if mode == "async":
                stage.runtime.run(batches, [optim.lr] * 3)
            else:
                for batch in batches:
                    stage.runtime.run([batch], [optim.lr])
            for name, p in stage.model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                case = f"{sharding} {mode} h={h} clip={optim.grad_clip} {name}"
                torch.testing.assert_close(
                    full.detach(),
                    expected[name],
                    rtol=0,
                    atol=1e-9,
                    msg=lambda m, case=case: f"{case}: {m}",
                )
            # one momentum buffer per parameter, split over the two replicas (rows unevenly)
            states: list = [None, None]
            state = optimizer_state_numel(stage.optimizer)
            dist.all_gather_object(states, state, group=groups.data_parallel)
            stateful = sum(p.numel() for p in stage.optimizer.state)  # their full sizes
            assert sum(states) == stateful and max(states) <= 0.6 * stateful, (states, stateful)
            dist.barrier()


def test_fsdp_sharded_stages_equal_unsharded_training():
    run(check_sharded, 4, "fsdp", timeout=300)


def test_sharded_checkpoint_resumes_unsharded_on_another_layout(tmp_path):
    """P = 2 x D = 2 with FSDP for 3 steps, then P = 4 unsharded: one process's weights."""
    extra = ["horizon.horizon=2", "model.head=aux", "optim.name=sgd", "optim.lr=0.05"]
    single = single_process_run(tmp_path, *extra, "train.max_steps=6")
    common = [*TINY, *extra, f"run.out_dir={tmp_path}", "run.name=moved"]
    sharded = ["pipeline.stages=2", "pipeline.replicas=2", "pipeline.sharding=fsdp"]
    first = mpc_dist("train", "--nproc", "4", *sets(*common, *sharded, "train.max_steps=3"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = mpc_dist(
        "train",
        "--nproc",
        "4",
        "--resume",
        *sets(*common, "train.max_steps=6", "pipeline.stages=4"),
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_weights(single, tmp_path / "moved")


def test_large_model_features_together_on_cpu(tmp_path):
    """configs/vit_tiny_large_cpu.yaml: a timm ViT, LoRA, bf16-mixed, activation checkpointing,
    2 stages x 2 FSDP-sharded replicas, async: it learns, and the frozen weights stay put."""
    from mpc_dist.config import load_config
    from mpc_dist.models import instantiate
    from mpc_dist.train import load_run_weights
    from mpc_dist.train.metrics import MetricsLogger

    result = mpc_dist(
        "train",
        "--nproc",
        "4",
        "--config",
        "configs/vit_tiny_large_cpu.yaml",
        *sets(
            "train.max_steps=20", f"run.out_dir={tmp_path}", "run.plot=false", "run.progress=false"
        ),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config(tmp_path / "vit_tiny_large_cpu" / "config.yaml")
    records = MetricsLogger.read(config.run_dir / "metrics.jsonl")
    assert [r["accuracy"] for r in records if r["kind"] == "eval"][-1] > 0.2  # chance: 0.1
    trained = load_run_weights(config.run_dir)
    initial = instantiate(
        build_model(config.model, (1, 28, 28), 10, device="meta"), "cpu", torch.float32, seed=0
    ).state_dict()
    frozen = [k for k in trained if "lora_" not in k and not k.startswith(("head.", "aux_heads."))]
    assert len(frozen) > 20
    for name in frozen:
        torch.testing.assert_close(
            trained[name], initial[name.replace(".base_layer.", ".")], rtol=0, atol=0, msg=name
        )
