"""`mpc-dist data-study`: the streaming path on real images, measured (docs/data.md).

Fashion-MNIST written as an image folder of PNGs, read through the Loader with timm's
augmentation (random resized crop, flip, light RandAugment, mixup, label smoothing), training a
residual MLP (T = 8) and a tiny ViT (T = 4) with back-propagation (h = T), h = 1, shrinking h = 2
and receding h = T/2 in one process each (a pool of them); then in a real 2-process pipeline
(`mpc-dist train --nproc 2`): MPC h = 1 async and shrinking h = 2 async against
back-propagation under the fastest of torch.distributed.pipelining's schedules on the same
network, data and optimizer (``torch_bp``). Final top-1 and top-5, steps and training seconds to
a target accuracy, and the loader's images/s per worker next to timm's (``bench-data``).

Training seconds come from each run's records (``metrics.jsonl``, one per step): the time
between evaluations, evaluations and process start excluded, the steps before the first
evaluation at the run's mean rate. A run finished under --out is read back, not trained again;
an unfinished one starts over (its times would otherwise span two processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..config import Config
from ..console import console
from ..data.bench import main as bench_data
from ..data.export import export_data
from ..train import train
from ..train.metrics import MetricsLogger
from .common import TINY_VIT, in_processes, num_blocks, replace_between, study_config, train_once
from .torch_bp import SCHEDULES

MODELS = {  # name -> overrides of configs/quickstart.yaml
    "mlp": ["model.name=residual_mlp", "model.num_blocks=8", "model.width=256", "model.hidden=512"],
    "vit": TINY_VIT,
}
POLICY = "rand-m6-n1-mstd0.5-inc1"  # light RandAugment: one op per image at magnitude ~6
AUGMENT = [
    "augment.enabled=true",
    f"augment.auto_augment={POLICY}",
    "augment.scale=[0.35,1.0]",
    "augment.mixup=0.2",
    "augment.label_smoothing=0.1",
]
BATCH, MICROBATCHES = 128, 4
REACHED_BY = 2 / 3  # the target: the best accuracy two-thirds of a network's runs reach
BEGIN, END = "<!-- results: mpc-dist data-study -->", "<!-- end of results -->"
HEADING = "## Study: the streaming path on Fashion-MNIST"


@dataclasses.dataclass(frozen=True)
class Run:
    model: str
    rule: str
    horizon: int
    where: str  # single (one process) | pipeline (ours, 2 processes, async) | torch (2 processes)

    @property
    def name(self) -> str:
        return f"{self.model}_{self.where}_{self.rule}_h{self.horizon}"

    @property
    def label(self) -> str:
        T = num_blocks(MODELS[self.model])
        if self.horizon == T:
            return "back-propagation"
        half = " (T/2)" if self.horizon == T // 2 and self.rule == "receding" else ""
        rule = "" if self.horizon == 1 else f"{self.rule} "
        mode = " async" if self.where == "pipeline" else ""
        return f"MPC {rule}h = {self.horizon}{half}{mode}"


def study_runs(models: list[str]) -> list[Run]:
    runs = []
    for model in models:
        T = num_blocks(MODELS[model])
        single = [("receding", T), ("receding", 1), ("shrinking", 2), ("receding", T // 2)]
        runs += [Run(model, rule, h, "single") for rule, h in dict.fromkeys(single)]
        runs += [Run(model, "receding", 1, "pipeline"), Run(model, "receding", T, "torch")]
        runs.append(Run(model, "shrinking", 2, "pipeline"))
    return runs


def run_config(run: Run, args) -> Config:
    settings = [
        *MODELS[run.model],
        "model.head=aux",
        "data.dataset=folder",
        f"data.root={data_root(args)}",
        "data.image_size=28",
        f"data.batch_size={BATCH}",
        f"data.num_microbatches={MICROBATCHES}",
        "data.eval_batch_size=500",
        "data.num_workers=1",
        *AUGMENT,
        f"horizon.rule={run.rule}",
        f"horizon.horizon={run.horizon}",
        "optim.warmup_steps=20",
        f"train.epochs={args.epochs}",
        f"train.max_steps={args.max_steps}",
        f"train.eval_every={args.eval_every}",
        "train.log_every=1",
    ]
    if run.where != "single":
        mode = "async" if run.where == "pipeline" else "sync"
        settings += ["pipeline.stages=2", f"pipeline.mode={mode}"]
    return study_config(settings, args.out, run.name)


def data_root(args) -> Path:
    return Path(args.out) / f"{args.dataset}_{args.train_images}_{args.test_images}"


def export(args) -> Path:
    """The image folder: ``--train-images`` training and ``--test-images`` test PNGs (balanced
    over the classes, the first of each class), written once."""
    root = data_root(args)
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        for split, limit in (("train", args.train_images), ("val", args.test_images)):
            export_data(args.dataset, "folder", root / f"all_{split}", limit=limit)
            (root / f"all_{split}" / split).rename(root / split)
            shutil.rmtree(root / f"all_{split}")
        (root / ".complete").write_text("")
    return root


def train_clock(run_dir: Path) -> dict[int, float]:
    """Training seconds at each evaluation's step, from the run's records: from one evaluation's
    end to the next evaluation's start (the last step's record); the steps before the first
    evaluation at the mean rate of the rest (their start is not recorded)."""
    records = MetricsLogger.read(run_dir / "metrics.jsonl")
    ends: dict[int, float] = {}  # step -> time of its train record
    clock, elapsed, resumed, first = {}, 0.0, None, None
    for record in records:
        if record["kind"] == "train":
            ends[record["step"]] = record["time"]
        elif record["kind"] == "eval":
            step = record["step"]
            if resumed is None:
                first = step
            else:
                elapsed += ends[step] - resumed[1]
            clock[step], resumed = elapsed, (step, record["time"])
    later = max(clock) - first
    rate = clock[max(clock)] / later if later else 0.0
    return {step: seconds + first * rate for step, seconds in clock.items()}


class Usage:
    """Wall seconds, CPU seconds of this process and its waited-for descendants (loader
    workers, torchrun's ranks), and the machine's load average, from start to end."""

    def __enter__(self) -> Usage:
        gc.collect()  # loader workers of an earlier run reaped before counting
        self.start, self.cpu, self.load = time.perf_counter(), _cpu(), os.getloadavg()[0]
        return self

    def __exit__(self, *_) -> None:
        gc.collect()
        self.wall_s, self.cpu_s = time.perf_counter() - self.start, _cpu() - self.cpu
        self.loads = (self.load, os.getloadavg()[0])


def _cpu() -> float:
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages)


def _result(run: Run, config: Config, usage: Usage) -> dict:
    records = MetricsLogger.read(config.run_dir / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    clock = train_clock(config.run_dir)
    result = {
        **dataclasses.asdict(run),
        "evals": [(r["step"], r["accuracy"], r["top5"], clock[r["step"]]) for r in evals],
        "accuracy": evals[-1]["accuracy"],
        "top5": evals[-1]["top5"],
        "steps": evals[-1]["step"],
        "train_s": clock[evals[-1]["step"]],
        "wall_s": usage.wall_s,
        "cpu_s": usage.cpu_s,
        "load": usage.loads,
        "data_wait_s": evals[-1].get("data_wait_s"),
    }
    if run.where == "torch":
        result.update(json.loads((config.run_dir / "torch.json").read_text()))
    return result


def _single(item: tuple[Run, Config]) -> dict:
    """One single-process run (or its result, read back)."""
    run, config = item

    def record() -> dict:
        shutil.rmtree(config.run_dir, ignore_errors=True)  # an unfinished earlier try
        with Usage() as usage:
            train(config)
        return _result(run, config, usage)

    return train_once(config, record)


def _two_processes(run: Run, config: Config, args) -> dict:
    """Ours through `mpc-dist train --nproc 2`, or back-propagation under torch's schedules
    through torchrun; the output in ``--out``/logs."""
    folder = Path(args.out) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run.name}.yaml"
    path.write_text(config.to_yaml())
    if run.where == "pipeline":
        command = ["-m", "mpc_dist.cli", "train", "--nproc", "2", "--config", str(path)]
    else:
        command = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "mpc_dist.studies.torch_bp",
            "--config",
            str(path),
            "--schedules",
            ",".join(args.schedules),
            "--probe-steps",
            str(args.probe_steps),
            "--probe-rounds",
            str(args.probe_rounds),
        ]

    def record() -> dict:
        shutil.rmtree(config.run_dir, ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with Usage() as usage, (folder / f"{run.name}.log").open("w") as log:
            code = subprocess.call([sys.executable, *command], stdout=log, stderr=log, env=env)
        if code:
            tail = (folder / f"{run.name}.log").read_text()[-2000:]
            raise RuntimeError(f"{run.name} failed ({code}):\n{tail}")
        return _result(run, config, usage)

    return train_once(config, record)


def loader_throughput(args) -> dict:
    """`mpc-dist bench-data` on the study's folder at its size and policy, kept once."""
    done = Path(args.out) / f"bench_data_{args.train_images}.json"
    if not done.exists():
        bench = argparse.Namespace(
            root=str(data_root(args)),
            image_size=28,
            workers=1,
            batch_size=BATCH,
            batches=args.bench_batches,
            repeats=args.bench_repeats,
            auto_augment=POLICY,
            re_prob=0.0,
        )
        done.write_text(json.dumps(bench_data(bench)))
    return json.loads(done.read_text())


def target(results: list[dict]) -> float:
    """The best top-1 that two-thirds of the runs reach at some evaluation, rounded down to a
    whole percent."""
    bests = sorted((max(a for _, a, _, _ in r["evals"]) for r in results), reverse=True)
    return math.floor(100 * bests[math.ceil(REACHED_BY * len(bests)) - 1]) / 100


def to_target(result: dict, goal: float) -> tuple[int, float] | None:
    """(steps, training seconds) at the first evaluation at or above ``goal``."""
    return next(((s, c) for s, a, _, c in result["evals"] if a >= goal), None)


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = export(args)
    console.print(f"data study: images in {root}; loader throughput (bench-data)")
    throughput = loader_throughput(args)
    runs = study_runs(args.models)
    singles = [(r, run_config(r, args)) for r in runs if r.where == "single"]
    results = []
    for (run, _), result, seconds in in_processes(_single, singles, args.workers):
        results.append(result)
        console.print(f"{run.name}: {100 * result['accuracy']:.2f} % ({seconds:.0f} s)")
    for run in (r for r in runs if r.where != "single"):
        results.append(_two_processes(run, run_config(run, args), args))
        console.print(f"{run.name}: {100 * results[-1]['accuracy']:.2f} %")
    minutes = span_minutes([run_config(run, args) for run in runs])
    loads = [load for r in results for load in r["load"]]
    summary = {
        "args": vars(args),
        "minutes": minutes,
        "load": [min(loads), max(loads)],
        "throughput": throughput,
        "runs": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    text = report(summary, args, plot(results, args))
    replace_between(Path(args.doc), BEGIN, END, text, HEADING)
    console.print(text)
    console.print(f"data study: runs over {minutes:.1f} min; wrote {args.doc}, {out}/results.json")


def span_minutes(configs: list[Config]) -> float:
    """Minutes from the first run's first record to the last run's last: when the runs were
    trained (a study read back reports the span it was trained in, not its own)."""
    records = [MetricsLogger.read(c.run_dir / "metrics.jsonl") for c in configs]
    return (max(r[-1]["time"] for r in records) - min(r[0]["time"] for r in records)) / 60


def plot(results: list[dict], args) -> Path:
    """Test top-1 against training steps and seconds, a column per network, next to the document."""
    from .plots import data_study_curves

    labelled = [{**r, "label": f"{label(r)} ({processes(r)})"} for r in results]
    targets = {m: target([r for r in results if r["model"] == m]) for m in args.models}
    path = Path(args.doc).parent / "img" / "data_study.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return data_study_curves(labelled, targets, path)


def label(result: dict) -> str:
    return Run(result["model"], result["rule"], result["horizon"], result["where"]).label


def processes(result: dict) -> str:
    where = result["where"]
    return {"single": "1 process", "pipeline": "2 processes"}.get(where, "torch, 2 processes")


def report(summary: dict, args, picture: Path | None = None) -> str:
    results, load = summary["runs"], summary["load"]
    steps_per_epoch = args.train_images // BATCH
    lines = [
        f"Produced by `mpc-dist data-study`, its runs trained over {summary['minutes']:.0f} "
        f"minutes on this project's 2-core CPU machine, shared with other jobs (load average "
        f"between {load[0]:.1f} and {load[1]:.1f} at the runs' starts and ends). "
        f"{args.dataset}: {args.train_images} training "
        f"and {args.test_images} test PNGs, 28 px; {args.epochs} epochs of {steps_per_epoch} "
        f"steps of {BATCH} images ({MICROBATCHES} microbatches), evaluated every "
        f"{args.eval_every} steps and at epoch ends.",
        "",
    ]
    for model in args.models:
        lines += model_table(model, [r for r in results if r["model"] == model])
    lines += schedule_table(results, args)
    lines += throughput_table(summary["throughput"])
    if picture is not None:
        relative = picture.relative_to(Path(args.doc).parent)
        lines += [f"![test top-1 against training steps and seconds]({relative.as_posix()})", ""]
    return "\n".join(lines) + "\n"


def model_table(model: str, results: list[dict]) -> list[str]:
    """A row per run: one process first, then the 2-process runs against torch's."""
    goal = target(results)
    order = {"single": 0, "torch": 1, "pipeline": 2}
    results = sorted(results, key=lambda r: order[r["where"]])
    torch_run = next((r for r in results if r["where"] == "torch"), None)
    torch_reached = to_target(torch_run, goal) if torch_run else None
    lines = [
        f"**{model}** (T = {num_blocks(MODELS[model])}); target: top-1 {100 * goal:.0f} %",
        "",
        "| training | processes | final top-1 % | final top-5 % | best top-1 % | steps to target "
        "| training s to target | torch BP's s / this | training s per step | data wait s "
        "| CPU s (whole run) | load average (start, end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        steps, seconds = to_target(r, goal) or ("-", None)
        ratio = ""
        if r["where"] != "single" and seconds and torch_reached:
            ratio = f"{torch_reached[1] / seconds:.2f}"
        cells = (
            label(r),
            {
                "single": "1 (two runs at a time)",
                "pipeline": "2 (`--nproc 2`)",
                "torch": f"2 (torch `{r.get('schedule')}`)",
            }[r["where"]],
            f"{100 * r['accuracy']:.2f}",
            f"{100 * r['top5']:.2f}",
            f"{100 * max(a for _, a, _, _ in r['evals']):.2f}",
            str(steps),
            "-" if seconds is None else f"{seconds:.0f}",
            ratio,
            f"{r['train_s'] / r['steps']:.2f}",
            "" if r["data_wait_s"] is None else f"{r['data_wait_s']:.0f}",
            f"{r['cpu_s']:.0f}",
            f"{r['load'][0]:.0f}, {r['load'][1]:.0f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def schedule_table(results: list[dict], args) -> list[str]:
    torch_runs = [r for r in results if r["where"] == "torch" and r.get("probe")]
    if not torch_runs:
        return []
    lines = [
        f"torch.distributed.pipelining's schedules on these networks, 2 processes: seconds per "
        f"training step (median of {args.probe_rounds} rounds of {args.probe_steps} steps, the "
        f"schedules taking turns); back-propagation trained under the fastest.",
        "",
        "| schedule | " + " | ".join(r["model"] for r in torch_runs) + " |",
        "|---|" + "---|" * len(torch_runs),
    ]
    for name in args.schedules:
        cells = []
        for r in torch_runs:
            got = r["probe"].get(name, {})
            cells.append(f"{got['step_s']:.3f}" if "step_s" in got else got.get("error", "-"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def throughput_table(rates: dict) -> list[str]:
    """bench-data's medians (and the rounds' spread, where recorded), ours against timm's."""
    names = {
        "mpc_dist Loader": "ours (`Loader`)",
        "timm create_loader": "timm `create_loader`",
        "timm create_loader prefetcher": "timm `create_loader`, prefetcher",
    }
    rounds = rates.get("rounds", {})
    lines = [
        f"Loader throughput (`mpc-dist bench-data`, 28 px, 1 worker, batches of {BATCH}, "
        f"`{POLICY}`; median [min, max] of {len(rounds.get('mpc_dist Loader', [])) or 'the'} "
        "interleaved rounds):",
        "",
        "| loader | images/s per worker | images per CPU second | ours / this, per CPU second |",
        "|---|---|---|---|",
    ]
    ours = rates["mpc_dist Loader cpu"]
    for name, shown in names.items():
        if name not in rates:
            continue
        spread = [""] * 2
        if rounds.get(name):
            spread = [f" [{min(v):.0f}, {max(v):.0f}]" for v in zip(*rounds[name], strict=True)]
        cells = (
            shown,
            f"{rates[name]:.0f}{spread[0]}",
            f"{rates[f'{name} cpu']:.0f}{spread[1]}",
            f"{ours / rates[f'{name} cpu']:.3f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/data-study")
    parser.add_argument("--doc", default="docs/data.md", help="where the report is written")
    parser.add_argument(
        "--models",
        type=lambda s: s.split(","),
        default=list(MODELS),
        help=f"of {', '.join(MODELS)}",
    )
    parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "mnist"))
    parser.add_argument("--train-images", type=int, default=10000, help="balanced over classes")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=0, help="cut every run short (smoke)")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between evaluations")
    parser.add_argument("--workers", type=int, default=2, help="single-process runs at a time")
    parser.add_argument(
        "--schedules",
        type=lambda s: s.split(","),
        default=list(SCHEDULES),
        help="torch's schedule classes to time",
    )
    parser.add_argument("--probe-steps", type=int, default=6)
    parser.add_argument("--probe-rounds", type=int, default=3)
    parser.add_argument("--bench-batches", type=int, default=10)
    parser.add_argument("--bench-repeats", type=int, default=3)
