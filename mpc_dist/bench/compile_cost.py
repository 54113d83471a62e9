"""Compile's effect on training (``train.compile: blocks``), from real runs of a config: the
first step's compile seconds and the time per step after warm-up, eager against compiled, in one
process or a pipeline. Runs alternate (eager, compiled, eager, ...) so drift in machine load
affects both alike; the median over repeats is reported. The runs share a fresh inductor cache:
the first compiled run compiles cold, later ones find their kernels cached (as a rerun would).

    mpc-dist bench-compile --config configs/quickstart.yaml --nproc 2 --steps 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ..console import console
from ..train.metrics import MetricsLogger

WARMUP_STEPS = 20  # steps left out of the step time (compilation, allocator warm-up)
LOG_EVERY = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run to time, e.g. quickstart.yaml")
    parser.add_argument("--nproc", type=int, default=1, help="processes (pipeline.stages)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant (median taken)")
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--set", action="append", default=[], help="more config overrides")


def _run(args: argparse.Namespace, compile_: str, out_dir: Path, name: str) -> dict[str, float]:
    """One training run; its step time after warm-up and its compile record."""
    overrides = [
        f"train.compile={compile_}",
        f"train.compile_backend={args.backend}",
        f"train.max_steps={args.steps}",
        f"train.log_every={LOG_EVERY}",
        "train.epochs=1",
        f"pipeline.stages={args.nproc}",
        f"run.out_dir={out_dir}",
        f"run.name={name}",
        "run.progress=false",
        "run.tensorboard=false",
        "run.plot=false",
        *args.set,
    ]
    command = [sys.executable, "-m", "mpc_dist.cli", "train", "--config", args.config]
    if args.nproc > 1:
        command[4:4] = ["--nproc", str(args.nproc)]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out_dir / "inductor-cache")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    records = MetricsLogger.read(out_dir / name / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train" and r["step"] >= WARMUP_STEPS]
    seconds = (train[-1]["time"] - train[0]["time"]) / (train[-1]["step"] - train[0]["step"])
    compiled = [r for r in records if r["kind"] == "compile"]
    return {"step_ms": 1000 * seconds, **(compiled[-1] if compiled else {})}


def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.steps < WARMUP_STEPS + 2 * LOG_EVERY:
        raise SystemExit(f"--steps: at least {WARMUP_STEPS + 2 * LOG_EVERY} (warm-up + 2 logs)")
    runs: dict[str, list[dict[str, float]]] = {"none": [], "blocks": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in runs:
                runs[variant].append(_run(args, variant, Path(tmp), f"{variant}-{repeat}"))
    eager = {"step_ms": statistics.median(s["step_ms"] for s in runs["none"])}
    compiled = {"step_ms": statistics.median(s["step_ms"] for s in runs["blocks"])}
    first, *rest = runs["blocks"]
    compiled["compile_cold_s"] = first["compile_first_step_s"]
    compiled["compile_warm_s"] = statistics.median(
        s["compile_first_step_s"] for s in rest or [first]
    )
    for key in ("graphs_first_step", "graph_breaks", "recompiles_after_second_step"):
        compiled[key] = max(s[key] for s in runs["blocks"])
    console.print(
        f"{Path(args.config).name}, {args.nproc} process(es), {args.steps} steps, median of "
        f"{args.repeats}; step time after {WARMUP_STEPS} steps"
    )
    console.print(f"eager:    {eager['step_ms']:8.2f} ms/step")
    ratio = compiled["step_ms"] / eager["step_ms"]
    console.print(
        f"compiled: {compiled['step_ms']:8.2f} ms/step ({ratio:.2f} x eager; {args.backend}); "
        f"first step compiles {compiled['graphs_first_step']:.0f} graphs in "
        f"{compiled['compile_cold_s']:.1f} s cold, {compiled['compile_warm_s']:.1f} s cached; "
        f"{compiled['graph_breaks']:.0f} graph breaks, "
        f"{compiled['recompiles_after_second_step']:.0f} graphs compiled after step 2"
    )
    return {"none": eager, "blocks": compiled}
