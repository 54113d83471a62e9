"""GPU acceptance checks: ``python scripts/gpu/acceptance.py STEP [STEP ...] [--device cuda]``.

Each step prints ``PASS: step`` or ``FAIL: step: why`` (``SKIP`` where the machine lacks what it
needs), and the exit code is 1 if any failed. ``accept_1gpu.sh`` and ``accept_multi_gpu.sh``
run them on CUDA; CI runs the steps whose logic does not need CUDA with ``--device cpu`` (gloo,
smaller models), so the steps keep working while the code changes.

Most steps go through the command line (``mpc-dist train ... --set``); the runtime, fp16 and
RNG steps call the library directly (they need a one-rank NCCL group or a forced overflow).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = [  # float64 and small: parallel runs must equal one process to 1e-9
    "model.num_blocks=4",
    "model.width=16",
    "model.hidden=24",
    "model.head=aux",
    "data.dataset=synthetic",
    "data.synthetic_size=256",
    "data.batch_size=32",
    "data.num_microbatches=4",
    "train.dtype=float64",
    "train.epochs=1",
    "train.max_steps=4",
    "optim.name=sgd",
    "optim.lr=0.05",
    "horizon.horizon=2",
    "run.progress=false",
    "run.tensorboard=false",
    "run.plot=false",
    "train.tf32=false",
]


@dataclass
class Context:
    device: str  # cuda | cpu
    out: Path  # runs and logs
    gpus: int  # visible CUDA devices (0 on CPU)

    def train_device(self) -> str:
        return f"train.device={self.device}"


class Skip(Exception):
    """The machine lacks what the step needs (not a failure)."""


# ----------------------------------------------------------------------------- helpers


def mpc_dist(
    ctx: Context, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``mpc-dist ARGS`` in a subprocess with this interpreter and this checkout (``env``:
    variables to add); the command and its output go to a log under ``ctx.out``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "mpc_dist.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = ctx.out / "logs"
    log.mkdir(parents=True, exist_ok=True)
    name = f"{int(time.time() * 1000)}-{args[0]}.log"
    (log / name).write_text(f"$ mpc-dist {' '.join(args)}\n{done.stdout}\n{done.stderr}")
    return done


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def train(
    ctx: Context,
    name: str,
    *overrides: str,
    config: str | None = None,
    nproc: int = 1,
    resume: bool = False,
    timeout: float = 600,
) -> Path:
    """Train run ``name`` under ``ctx.out``; returns its directory (raises on failure)."""
    args = ["train", *(["--config", config] if config else [])]
    args += ["--nproc", str(nproc)] if nproc > 1 else []
    args += ["--resume"] if resume else []
    args += sets(*overrides, ctx.train_device(), f"run.out_dir={ctx.out}", f"run.name={name}")
    done = mpc_dist(ctx, *args, timeout=timeout)
    if done.returncode:
        raise AssertionError(f"mpc-dist {' '.join(args)} failed: {_last_line(done.stderr)}")
    return ctx.out / name


def same_weights(run_a: Path, run_b: Path, atol: float) -> float:
    """The largest weight difference of two runs; raises above ``atol``."""
    from mpc_dist.train import compare_runs

    differences = compare_runs(run_a, run_b)
    worst = max(differences, key=differences.get)
    if differences[worst] > atol:
        raise AssertionError(
            f"{run_a.name} vs {run_b.name}: {worst} differs by {differences[worst]:.3g} > {atol:g}"
        )
    return differences[worst]


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("mpc-dist")]
    return (ours or lines or ["(no output)"])[-1][:300]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(ctx: Context) -> torch.device:
    return torch.device("cuda", 0) if ctx.device == "cuda" else torch.device("cpu")


# ----------------------------------------------------------------------------- one GPU


def env(ctx: Context) -> str:
    """CUDA is usable and the doctor passes for the quickstart on this machine."""
    if ctx.device == "cuda":
        assert torch.cuda.is_available(), "torch sees no CUDA device"
    done = mpc_dist(
        ctx,
        "doctor",
        "--config",
        "configs/quickstart.yaml",
        *sets(ctx.train_device(), f"run.out_dir={ctx.out}"),
    )
    assert done.returncode == 0, _last_line(done.stderr)
    found = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if torch.cuda.is_available():
        found += f", NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, "
        found += ", ".join(torch.cuda.get_device_name(i) for i in range(ctx.gpus))
    return found


def vit_resume(ctx: Context) -> str:
    """ViT-B/16 at 224 px (CPU: a tiny ViT) in bf16 with activation checkpointing: 4 steps
    with checkpoints, resumed to 6, equals 6 steps straight through (SGD: a lost momentum or
    random state would show)."""
    model = (
        ["model.name=vit_b_16", "model.image_size=224", "data.batch_size=64"]
        if ctx.device == "cuda"
        else [
            "model.name=vit_tiny",
            "model.num_blocks=4",
            "model.width=32",
            "model.hidden=64",
            "model.num_heads=2",
            "data.batch_size=16",
        ]
    )
    common = [
        *model,
        "model.head=aux",
        "horizon.horizon=4",
        "data.dataset=synthetic",
        "data.synthetic_size=512",
        "data.num_microbatches=4",
        "optim.name=sgd",
        "optim.lr=0.01",
        "optim.warmup_steps=0",
        "train.precision=bf16-mixed",
        "train.activation_checkpointing=blocks",
        "run.checkpoint_every=2",
        "run.progress=false",
        "run.plot=false",
        "run.tensorboard=false",
        "train.eval_every=0",
        "data.eval_batch_size=256",
    ]
    straight = train(ctx, "vit_straight", *common, "train.max_steps=6")
    train(ctx, "vit_resumed", *common, "train.max_steps=4")
    resumed = train(ctx, "vit_resumed", *common, "train.max_steps=6", resume=True)
    atol = 1e-4 if ctx.device == "cuda" else 0.0  # CUDA kernels may sum in another order
    return f"max |resumed - straight| = {same_weights(resumed, straight, atol):.3g}"


def loss_factor(ctx: Context) -> str:
    """The fp16 loss factor equals share x scale, also while the GPU is busy (the scale is
    read after the queued work, not before its copy lands)."""
    from mpc_dist.core import ComputeOptions
    from mpc_dist.rules.common import loss_factor as factor
    from mpc_dist.train.precision import grad_scaler

    device = _device(ctx)
    scaler = grad_scaler(ComputeOptions(autocast_dtype=torch.float16), device)
    scaler.scale(torch.zeros((), device=device))
    expected = 0.25 * scaler.get_scale()
    got = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work queued ahead
        got.append(factor(scaler.scale, 0.25, device))
    assert all(g == expected for g in got), (got, expected)
    return f"{got[0]:g} = 0.25 x {scaler.get_scale():g}"


def fp16_overflow(ctx: Context) -> str:
    """An inf gradient under fp16 skips the step and lowers the scale; the next step moves."""
    from mpc_dist.config import OptimConfig
    from mpc_dist.core import ComputeOptions
    from mpc_dist.train import OptimizerStep, build_optimizer
    from mpc_dist.train.precision import grad_scaler

    device = _device(ctx)
    model = torch.nn.Linear(4, 2, device=device)
    optimizer = build_optimizer(OptimConfig("sgd", lr=0.1), model.parameters())
    scaler = grad_scaler(ComputeOptions(autocast_dtype=torch.float16), device)
    step = OptimizerStep(optimizer, scaler=scaler)
    before, scale = model.weight.detach().clone(), scaler.get_scale()
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    step(torch.tensor(1.0), 0.1)
    assert torch.equal(model.weight, before) and scaler.get_scale() < scale
    model.weight.grad = torch.ones_like(model.weight)
    step(torch.tensor(1.0), 0.1)
    assert not torch.equal(model.weight, before)
    return f"scale {scale:g} -> {scaler.get_scale():g}"


def rng(ctx: Context) -> str:
    """A checkpoint restores the CPU generator and the CUDA generator of the model's device."""
    import tempfile

    from mpc_dist.config import OptimConfig
    from mpc_dist.train import Checkpointer, build_optimizer

    device = _device(ctx)
    model = torch.nn.Linear(3, 2, device=device)
    optimizer = build_optimizer(OptimConfig("adamw"), model.parameters())
    with tempfile.TemporaryDirectory(dir=ctx.out) as directory:
        checkpointer = Checkpointer(directory)
        path = checkpointer.save(1, model, optimizer, {"step": 1})
        expected = torch.rand(3), torch.rand(3, device=device)
        torch.rand(50), torch.rand(50, device=device)
        checkpointer.load(path, model, optimizer)
        assert torch.equal(torch.rand(3), expected[0])
        assert torch.equal(torch.rand(3, device=device), expected[1])
        saved = torch.load(Path(path) / "rng_rank0.pt")
    return "saved: " + ", ".join(sorted(saved))


def noise(ctx: Context) -> str:
    """The rules' noise is drawn on the device, from the seed alone (the same draws each time);
    on CUDA they differ from the CPU's (another generator)."""
    from mpc_dist.rules.common import draws, on_device

    device = _device(ctx)
    first = torch.randn(1000, generator=on_device(draws(0, 3, 1), device), device=device)
    again = torch.randn(1000, generator=on_device(draws(0, 3, 1), device), device=device)
    cpu = torch.randn(1000, generator=draws(0, 3, 1))
    assert first.device == device and torch.equal(first, again)
    same_as_cpu = torch.equal(first.cpu(), cpu)
    assert same_as_cpu == (device.type == "cpu"), same_as_cpu
    return f"on {device}, {'equal to' if same_as_cpu else 'not the'} CPU draws"


def tf32(ctx: Context) -> str:
    """train.tf32: on CUDA fp32 matmuls run in TF32 unless turned off."""
    from mpc_dist.train.precision import configure_tf32

    device = _device(ctx)
    if device.type != "cuda":
        assert not configure_tf32(True, device)
        return "nothing to switch on the CPU"
    a, b = (torch.randn(2048, 2048, device=device) for _ in range(2))
    exact = (a.double() @ b.double()).float()
    configure_tf32(True, device)
    fast = (a @ b - exact).abs().max().item()
    configure_tf32(False, device)
    full = (a @ b - exact).abs().max().item()
    assert fast > full, (fast, full)
    return f"max error TF32 {fast:.2g}, fp32 {full:.2g}"


def runtime(ctx: Context) -> str:
    """The pipeline runtime on a one-rank group (NCCL on CUDA, gloo on the CPU): FSDP2 over
    the group equals unsharded training (fp32, no TF32); bf16 and fp16 train; the clock
    (CUDA events on a GPU) gives busy <= wall."""
    import torch.distributed as dist

    from mpc_dist.train.precision import configure_tf32

    device = _device(ctx)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        configure_tf32(False, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        plain, _ = _one_rank_run(device, "none", None)
        sharded, _ = _one_rank_run(device, "fsdp", None)
        worst = max((sharded[k] - plain[k]).abs().max().item() for k in plain)
        assert worst <= 1e-5, worst
        losses = {p: _one_rank_run(device, "fsdp", p)[1] for p in (torch.bfloat16, torch.float16)}
        assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values()), losses
    finally:
        dist.destroy_process_group()
    return f"fsdp vs unsharded {worst:.2g}; bf16/fp16 losses {losses}"


def _one_rank_run(device: torch.device, sharding: str, precision: torch.dtype | None):
    """3 steps of a small ViT on this rank's group; its weights and losses."""
    import torch.distributed as dist

    from mpc_dist.config import ModelConfig, OptimConfig
    from mpc_dist.core import ComputeOptions, Plan
    from mpc_dist.models import build_model
    from mpc_dist.parallel import Groups, RuntimeOptions, ScheduleSpec, Topology, stage_ranges
    from mpc_dist.train import build_stage

    spec = ModelConfig(
        name="vit_tiny", num_blocks=4, width=32, hidden=64, num_heads=2, patch_size=7, head="aux"
    )
    group = dist.group.WORLD if sharding == "fsdp" else None
    groups = Groups(Topology(1, 1, 0), None, group)
    compute = ComputeOptions(autocast_dtype=precision, device_type=device.type)
    options = RuntimeOptions(schedule=ScheduleSpec(4), device=device, dtype=torch.float32)
    stage = build_stage(
        model=build_model(spec, (1, 28, 28), 10, device="meta"),
        plan=Plan("receding", 2, 4),
        ranges=stage_ranges([4]),
        groups=groups,
        optim=OptimConfig("sgd", lr=0.05),
        runtime=options,
        compute=compute,
        spec=spec,
        seed=0,
        sharding=sharding,
    )
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(3):
        x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
        losses += [r[0] for r in stage.runtime.run([(x, y)], [0.05])]
    times = stage.runtime.times
    assert 0 < times.busy <= 1.05 * times.wall, (times.busy, times.wall)
    weights = {
        k: getattr(v, "full_tensor", lambda v=v: v)().detach().cpu()
        for k, v in stage.model.named_parameters()
    }
    return weights, losses


def refusals(ctx: Context) -> str:
    """What a GPU node cannot run stops in one line: two ranks on one GPU, gloo with CUDA
    tensors, and the doctor names the first."""
    if ctx.device != "cuda":
        raise Skip("needs a CUDA device")
    one_gpu = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    common = [
        "--config",
        "configs/mnist_2stage.yaml",
        *sets(
            "data.dataset=synthetic",
            "train.max_steps=3",
            "run.progress=false",
            f"run.out_dir={ctx.out}",
            "train.device=cuda",
        ),
    ]
    started = time.monotonic()
    shared = mpc_dist(
        ctx,
        "train",
        "--nproc",
        "2",
        *common,
        *sets("run.name=two_on_one"),
        timeout=180,
        env=one_gpu,
    )
    assert shared.returncode != 0, "two ranks on one GPU trained"
    found = [
        f"two ranks on one GPU: failed after {time.monotonic() - started:.0f} s: "
        f"{_last_line(shared.stderr)}"
    ]
    gloo = mpc_dist(
        ctx,
        "train",
        "--nproc",
        "2",
        *common,
        *sets("pipeline.backend=gloo", "run.name=gloo"),
        timeout=180,
        env=one_gpu,
    )
    assert gloo.returncode != 0 and "pipeline.backend" in gloo.stderr, _last_line(gloo.stderr)
    found.append(f"gloo + CUDA: {_last_line(gloo.stderr)}")
    doctor = mpc_dist(ctx, "doctor", "--nproc", "2", *common, timeout=180, env=one_gpu)
    assert doctor.returncode == 1 and "FAIL device" in doctor.stderr, doctor.stderr[-500:]
    return " | ".join(found)


# ----------------------------------------------------------------------------- 2 to 8 GPUs


def _need_gpus(ctx: Context, count: int) -> None:
    if ctx.device == "cuda" and ctx.gpus < count:
        raise Skip(f"needs {count} GPUs, {ctx.gpus} visible")


def _pipeline(ctx: Context, stages: int, mode: str) -> str:
    _need_gpus(ctx, stages)
    layout = [f"pipeline.stages={stages}", f"pipeline.mode={mode}"]
    single = train(ctx, f"single_{stages}_{mode}", *TINY)
    piped = train(ctx, f"pipeline_{stages}_{mode}", *TINY, *layout, nproc=stages)
    return f"max |P={stages} - one process| = {same_weights(piped, single, 1e-9):.3g}"


def pipeline_2_sync(ctx: Context) -> str:
    """NCCL pipeline P = 2, sync, equals one process (float64)."""
    return _pipeline(ctx, 2, "sync")


def pipeline_2_async(ctx: Context) -> str:
    """NCCL pipeline P = 2, async, equals one process (float64)."""
    return _pipeline(ctx, 2, "async")


def pipeline_4_sync(ctx: Context) -> str:
    """NCCL pipeline P = 4, sync, equals one process (float64)."""
    return _pipeline(ctx, 4, "sync")


def pipeline_4_async(ctx: Context) -> str:
    """NCCL pipeline P = 4, async, equals one process (float64)."""
    return _pipeline(ctx, 4, "async")


def fsdp_replicas(ctx: Context) -> str:
    """D = 2 replicas sharded with FSDP (P = 2 with 4 GPUs, else P = 1) equal one process."""
    _need_gpus(ctx, 2)
    stages = 2 if ctx.device == "cpu" or ctx.gpus >= 4 else 1
    layout = [f"pipeline.stages={stages}", "pipeline.replicas=2", "pipeline.sharding=fsdp"]
    single = train(ctx, "single_fsdp", *TINY)
    sharded = train(ctx, "fsdp", *TINY, *layout, nproc=2 * stages)
    return f"P={stages} x D=2: max difference {same_weights(sharded, single, 1e-9):.3g}"


def ray_job(ctx: Context) -> str:
    """A Ray job of P = 2 (a GPU per worker) ends with the weights of the same torchrun run."""
    _need_gpus(ctx, 2)
    layout = ["pipeline.stages=2", f"ray.use_gpu={str(ctx.device == 'cuda').lower()}"]
    reference = train(ctx, "torchrun_2", *TINY, *layout, nproc=2)
    done = mpc_dist(
        ctx,
        "ray",
        *sets(*TINY, *layout, ctx.train_device(), f"run.out_dir={ctx.out}", "run.name=ray_2"),
    )
    assert done.returncode == 0, _last_line(done.stderr)
    return f"max |ray - torchrun| = {same_weights(ctx.out / 'ray_2', reference, 1e-9):.3g}"


def doctor_job(ctx: Context) -> str:
    """The doctor passes for every GPU of this node under torchrun."""
    ranks = max(2, min(ctx.gpus, 8)) if ctx.device == "cuda" else 2
    done = mpc_dist(
        ctx,
        "doctor",
        "--nproc",
        str(ranks),
        *sets(
            f"pipeline.stages={ranks}",
            "model.num_blocks=8",
            ctx.train_device(),
            f"run.out_dir={ctx.out}",
        ),
    )
    assert done.returncode == 0, _last_line(done.stderr)
    return f"{ranks} ranks: {_last_line(done.stderr)}"


def gpu_bench(ctx: Context) -> str:
    """`mpc-dist bench --real --device cuda` (where this version of the bench has it)."""
    help_text = mpc_dist(ctx, "bench", "--help").stdout
    if "--device" not in help_text:
        raise Skip("this mpc-dist bench has no --device option yet")
    stages = 2 if ctx.device == "cpu" else min(ctx.gpus, 8)
    done = mpc_dist(
        ctx, "bench", "--real", "--device", ctx.device, "--stages", str(stages), timeout=900
    )
    assert done.returncode == 0, _last_line(done.stderr)
    return _last_line(done.stdout)


ONE_GPU: dict[str, Callable[[Context], str]] = {
    "env": env,
    "loss-factor": loss_factor,
    "fp16-overflow": fp16_overflow,
    "rng": rng,
    "noise": noise,
    "tf32": tf32,
    "runtime": runtime,
    "vit-resume": vit_resume,
    "refusals": refusals,
}
MULTI_GPU: dict[str, Callable[[Context], str]] = {
    "doctor-job": doctor_job,
    "pipeline-2-sync": pipeline_2_sync,
    "pipeline-2-async": pipeline_2_async,
    "pipeline-4-sync": pipeline_4_sync,
    "pipeline-4-async": pipeline_4_async,
    "fsdp-replicas": fsdp_replicas,
    "ray": ray_job,
    "gpu-bench": gpu_bench,
}
STEPS = {**ONE_GPU, **MULTI_GPU}


def run_step(name: str, ctx: Context) -> bool:
    """Run one step; print its PASS/FAIL/SKIP line; True unless it failed."""
    started = time.monotonic()
    try:
        detail = STEPS[name](ctx)
    except Skip as why:
        print(f"SKIP: {name}: {why}", flush=True)
        return True
    except Exception as error:  # every failure is reported, the next step still runs
        where = traceback.extract_tb(error.__traceback__)[-1]
        print(
            f"FAIL: {name}: {type(error).__name__}: {str(error)[:400]} "
            f"({Path(where.filename).name}:{where.lineno})",
            flush=True,
        )
        return False
    print(f"PASS: {name} ({time.monotonic() - started:.0f} s): {detail}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="+", choices=[*STEPS, "one-gpu", "multi-gpu"])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default=None, help="runs and logs (default: a new temp dir)")
    args = parser.parse_args(argv)
    import tempfile

    out = Path(args.out or tempfile.mkdtemp(prefix="mpc-dist-accept-")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ctx = Context(args.device, out, gpus)
    names = [
        n for s in args.steps for n in {"one-gpu": ONE_GPU, "multi-gpu": MULTI_GPU}.get(s, [s])
    ]
    results = [run_step(name, ctx) for name in names]
    print(f"{sum(results)} of {len(results)} steps passed or skipped; logs in {out / 'logs'}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
