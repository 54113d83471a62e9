"""Per-block costs and memory against h on one GPU: ``python scripts/gpu/costs.py --out DIR``.

What docs/gpu.md records: for ViT-B/16 and ViT-L/16 at 224 px in bf16 (autocast, fp32
weights), a middle block's forward (F), input-gradient (B) and weight-gradient (W) times per
microbatch at each ``--batch`` (``core.costs``: median of repeats, CUDA-synchronised); the peak
CUDA memory of one training step of the whole model against the horizon h (HorizonEngine, aux
heads, one microbatch of the last ``--batch``), beside the engine's own accounting of saved
activations; and the simulator's P = 8 projection (one block per stage) fed with those costs.
Writes ``costs.json``. ``--device cpu --small`` runs the same code on a tiny ViT (CI checks it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mpc_dist.bench.simulator import project  # noqa: E402
from mpc_dist.config import ModelConfig  # noqa: E402
from mpc_dist.core import ComputeOptions, EngineOptions, HorizonEngine, Plan  # noqa: E402
from mpc_dist.core.compile import compile_blocks  # noqa: E402
from mpc_dist.core.costs import measure_model_block, model_block_costs  # noqa: E402
from mpc_dist.models import build_model, instantiate  # noqa: E402
from mpc_dist.parallel import Costs  # noqa: E402

SMALL = ModelConfig(name="vit_tiny", num_blocks=4, width=32, hidden=64, num_heads=2, head="aux")


def models(small: bool) -> dict[str, ModelConfig]:
    if small:
        return {"vit_tiny": SMALL}
    names = ("vit_b_16", "vit_l_16")
    return {name: ModelConfig(name=name, image_size=224, head="aux") for name in names}


def block_costs(spec: ModelConfig, size: tuple, batch: int, device, compute) -> dict:
    """F, B, W (ms) of a middle block at ``batch`` samples per microbatch."""
    measured = model_block_costs(
        spec, size, batch, device, torch.float32, repeats=20, compute=compute
    )
    return {k: 1000 * v for k, v in dataclasses.asdict(measured).items()}


def compiled_block_costs(spec: ModelConfig, size: tuple, batch: int, device, compute) -> dict:
    """F, B, W (ms) of the same middle block compiled with inductor (``train.compile: blocks``);
    its compilation happens in the warm-up, which is not counted."""
    model = build_model(spec, size, 10, device="meta")
    t = model.num_blocks // 2
    part = instantiate(model.split(t, t + 1), device, torch.float32, seed=0)
    compile_blocks(part, "inductor")
    sample = compute.state(torch.randn(batch, *model.state_shapes[t], device=device))
    measured = measure_model_block(part, t, sample, compute, repeats=20)
    return {k: 1000 * v for k, v in dataclasses.asdict(measured).items()}


def memory_against_h(spec: ModelConfig, size: tuple, batch: int, device, compute) -> list[dict]:
    """Peak CUDA memory (MiB) of one training step of the whole model per receding h, and the
    engine's peak of saved activations."""
    model = build_model(spec, size, 1000, device=device, seed=0)
    T = model.num_blocks
    x = torch.randn(batch, *size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    rows = []
    HorizonEngine(model, Plan("receding", T, T), EngineOptions(compute=compute)).train_microbatch(
        x, y
    )  # warm-up: kernels chosen, allocator grown once
    for h in sorted({1, 2, 4, T // 2, T}):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        engine = HorizonEngine(model, Plan("receding", h, T), EngineOptions(compute=compute))
        started = time.perf_counter()
        engine.train_microbatch(x, y)
        row = {"h": h, "activations_mib": engine.memory.peak_bytes / 2**20}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            row["above_weights_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        row["step_ms"] = 1000 * (time.perf_counter() - started)
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


def projection(costs: dict, stages: int, latency_ms: float) -> list[dict]:
    """The simulator's time per minibatch at P = ``stages`` (one block per stage), m = P, 4P."""
    block = Costs(costs["forward"], costs["input_grad"], costs["weight_grad"], latency=latency_ms)
    configs = [("BP-1F1B", stages, "receding", "sync", "1f1b", False)]
    configs.append(("BP-1F1B, W deferred", stages, "receding", "sync", "1f1b", True))
    for rule, h in (("receding", 1), ("receding", 2), ("receding", 4), ("shrinking", 2)):
        for mode in ("sync", "async"):
            configs.append((f"{rule} h={h} {mode}", h, rule, mode, "horizon", False))
    rows = []
    for m in (stages, 4 * stages):
        bp, _ = project(stages, m, stages, "receding", "sync", "1f1b", block)
        for name, h, rule, mode, policy, defer in configs:
            ms, bubble = project(stages, m, h, rule, mode, policy, block, defer=defer)
            rows.append({"m": m, "config": name, "ms": ms, "speedup": bp / ms, "bubble": bubble})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="a tiny ViT (the CPU check)")
    parser.add_argument(
        "--batch",
        type=lambda s: [int(b) for b in s.split(",")],
        default=[32, 128],
        help="samples per microbatch: block costs at each; memory and projection at the last",
    )
    parser.add_argument(
        "--compile", action="store_true", help="block costs eager and compiled only"
    )
    parser.add_argument("--latency-ms", type=float, default=0.1, help="simulated P2P message")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    compute = ComputeOptions(autocast_dtype=dtype, device_type=device.type)
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    report["torch"], report["batch"] = torch.__version__, args.batch
    for name, spec in models(args.small).items():
        size = (1, 28, 28) if args.small else (3, 224, 224)
        per_batch = {}
        for batch in args.batch:
            costs = per_batch[batch] = block_costs(spec, size, batch, device, compute)
            f, b, w = costs["forward"], costs["input_grad"], costs["weight_grad"]
            print(f"{name}: F {f:.3f} ms, B {b:.3f} ms, W {w:.3f} ms per block at {batch} samples")
            if args.compile:
                costs = per_batch[f"{batch} compiled"] = compiled_block_costs(
                    spec, size, batch, device, compute
                )
                f, b, w = costs["forward"], costs["input_grad"], costs["weight_grad"]
                print(f"{name}: F {f:.3f} ms, B {b:.3f} ms, W {w:.3f} ms compiled (inductor)")
        if args.compile:
            report[name] = {"block_ms": per_batch}
            continue
        memory = memory_against_h(spec, size, args.batch[-1], device, compute)
        for row in memory:
            rest = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "h")
            print(f"  {name} h={row['h']}: {rest}")
        rows = projection(costs, 8, args.latency_ms)
        for r in rows:
            line = f"{r['ms']:8.2f} ms x{r['speedup']:.2f} bubble {r['bubble']:.1%}"
            print(f"  P=8 m={r['m']} {r['config']:<22} {line}")
        report[name] = {"block_ms": per_batch, "memory": memory, "projection_p8": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "costs.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
