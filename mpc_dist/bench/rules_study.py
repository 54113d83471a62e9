"""`mpc-dist rules-study`: the block-local rules next to back-propagation and MPC on the same
networks (docs/rules.md).

Forward-forward and forward gradient train plain ReLU MLPs (4 x 500 by default; the papers'
4 x 2000 with --width 2000), scalable forward-forward a small ResNet; back-propagation (h = T)
and MPC (receding h = 1, 2) train the same network with the same heads. MNIST and Fashion-MNIST,
one process per run, two at a time. Then each rule's per-block forward and update time on this
machine, and what they give a P = 4 pipeline (simulated with those costs) against BP-1F1B.
A run already finished under --out is read back, not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ..config import Config, load_config
from ..core import Plan
from ..models import build_model
from ..parallel import Costs, generate, simulate, stage_ranges, uniform_partition
from ..rules import make_engine, predict_by_average, predict_by_goodness
from ..train import Checkpointer, build_optimizer, load_dataset, train
from ..train.metrics import console

NETWORKS = {  # network -> overrides of configs/quickstart.yaml (the width set by --width)
    "mlp": ["model.name=relu_mlp", "model.num_blocks=4", "optim.weight_decay=0"],
    "resnet": ["model.name=resnet_small", "model.num_blocks=4", "model.width=8"],
}
RULES = {  # network -> (rule, horizon or T, head)
    "mlp": [("ff", 1, "shared"), ("forward_gradient", 1, "aux"), ("receding", 1, "aux"),
            ("receding", 2, "aux"), ("receding", 4, "aux")],
    "resnet": [("sff", 1, "goodness"), ("receding", 1, "goodness"), ("receding", 2, "goodness"),
               ("receding", 4, "goodness")],
}  # fmt: skip
PAPER = {  # rule -> what its paper reports on MNIST (test error), and on what
    "ff": "1.36 % (4 x 2000, 60 epochs)",
    "forward_gradient": "2.55 % (LG-FG-A, LocalMixer M/1/16)",
    "sff": "no MNIST figure (CIFAR-10 / ImageNette; 'comparable to BP')",
}


@dataclasses.dataclass(frozen=True)
class Run:
    network: str
    dataset: str
    rule: str
    horizon: int
    head: str

    @property
    def name(self) -> str:
        return f"{self.network}_{self.dataset}_{self.rule}_h{self.horizon}"

    @property
    def label(self) -> str:
        if self.rule == "receding":
            return "back-propagation" if self.horizon == 4 else f"MPC h = {self.horizon}"
        return self.rule


def run_config(run: Run, args) -> Config:
    width = args.width if run.network == "mlp" else 8
    return load_config("configs/quickstart.yaml", [
        *NETWORKS[run.network], f"model.width={width}", f"model.head={run.head}",
        f"data.dataset={run.dataset}", f"horizon.rule={run.rule}",
        f"horizon.horizon={run.horizon}",
        f"train.epochs={args.epochs if run.network == 'mlp' else args.conv_epochs}",
        f"train.max_steps={args.max_steps}", f"run.out_dir={args.out}/runs",
        f"run.name={run.name}", "run.progress=false", "run.tensorboard=false", "run.plot=false",
    ])  # fmt: skip


def _train(item: tuple[Run, Config]) -> dict:
    run, config = item
    done = config.run_dir / "study.json"
    if not done.exists():
        torch.set_num_threads(1)
        started = time.perf_counter()
        summary = train(config)
        result = {
            **dataclasses.asdict(run),
            "accuracy": summary["test accuracy"],
            "seconds": time.perf_counter() - started,
            **_other_predictions(run, config),
        }
        done.write_text(json.dumps(result))  # fmt: skip
    return json.loads(done.read_text())


def _other_predictions(run: Run, config: Config) -> dict:
    """Forward-forward's goodness over labels, scalable forward-forward's averaged votes."""
    if run.rule not in ("ff", "sff"):
        return {}
    test = load_dataset(config.data.dataset, "test")
    model = build_model(config.model, test.input_shape, test.num_classes)
    checkpoints = Checkpointer(config.run_dir / "checkpoints")
    checkpoints.load(checkpoints.latest(), model, build_optimizer(config.optim, model.parameters()))
    model.eval()
    correct = 0
    for x, y in zip(test.inputs.split(1000), test.targets.split(1000), strict=True):
        if run.rule == "ff":
            scores = predict_by_goodness(model, x, test.num_classes)
        else:
            scores = predict_by_average(model, x)
        correct += int((scores.argmax(-1) == y).sum())
    key = "goodness_accuracy" if run.rule == "ff" else "average_vote_accuracy"
    return {key: correct / len(test)}


def block_costs(network: str, rule: str, horizon: int, head: str, width: int) -> tuple[float, ...]:
    """Seconds per block on this machine (one thread, a microbatch of 128): the forward action
    and the update (local rules) or the backward (BP, split evenly into input and weight
    gradients, as the bubble bench does)."""
    torch.set_num_threads(1)
    overrides = [*NETWORKS[network], f"model.width={width if network == 'mlp' else 8}",
                 f"model.head={head}"]  # fmt: skip
    spec = load_config(None, overrides).model
    model = build_model(spec, (1, 28, 28), 10, seed=0)
    T = model.num_blocks
    engine = make_engine(model, Plan(rule, horizon, T), track_memory=False)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    forward = backward = 0.0
    for i in range(12):
        start = time.perf_counter()
        engine.forward(i, x, y, eager=False)
        middle = time.perf_counter()
        for s in reversed(Plan(rule, horizon, T).loss_points):
            engine.backward(i, s)
        end = time.perf_counter()
        if i >= 2:
            forward, backward = forward + middle - start, backward + end - middle
        model.zero_grad(set_to_none=True)
    return forward / 10 / T, backward / 10 / T


def pipeline_rows(args) -> list[dict]:
    """Each rule's step on a P = 4 pipeline (one block per stage), m = 16, from measured costs."""
    rows = []
    for network, rules in RULES.items():
        base = None
        for rule, h, head in rules:
            forward, backward = block_costs(network, rule, h, head, args.width)
            local = Plan(rule, h, 4).is_local
            costs = Costs(forward=forward, input_grad=0.0 if local else backward / 2,
                          weight_grad=backward if local else backward / 2)  # fmt: skip
            plan, ranges = Plan(rule, h, 4), stage_ranges(uniform_partition(4, 4))
            policy = "1f1b" if h == 4 and rule == "receding" else "horizon"
            for mode in ("sync", "async") if policy == "horizon" else ("sync",):
                schedule = generate(plan, ranges, 16, 8 if mode == "async" else 1, mode, policy)
                events = simulate(schedule, costs)
                per_step = max(e.end for e in events) / schedule.num_minibatches
                if policy == "1f1b":
                    base = per_step
                rows.append({"network": network, "rule": Run(network, "", rule, h, head).label,
                             "mode": mode if policy == "horizon" else "1F1B",
                             "forward_ms": 1e3 * forward, "update_ms": 1e3 * backward,
                             "step_ms": 1e3 * per_step})  # fmt: skip
        for row in rows:
            if row["network"] == network:
                row["vs_bp"] = base / row["step_ms"] * 1e3
    return rows


def report(results: list[dict], rows: list[dict], args) -> str:
    lines = [
        "# Learning rules: forward-forward, scalable forward-forward, forward gradient",
        "",
        f"Produced by `mpc-dist rules-study --out {args.out}` (one seed; MLP "
        f"{args.epochs} epochs at width {args.width}, ResNet {args.conv_epochs} epoch(s); "
        f"2-core CPU, no GPU).",
        "",
        "## Test accuracy (%)",
        "",
        "| network | rule | MNIST | Fashion-MNIST | other prediction (MNIST / F-MNIST) "
        "| train s (MNIST) | paper (MNIST test error) |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["network"], r["rule"], r["horizon"], r["dataset"]): r for r in results}
    for network, rules in RULES.items():
        for rule, h, head in rules:
            got = [by.get((network, rule, h, d)) for d in args.datasets]
            accuracy = [f"{100 * g['accuracy']:.2f}" if g else "-" for g in got]
            accuracy += ["-"] * (2 - len(accuracy))
            other = [g.get("goodness_accuracy", g.get("average_vote_accuracy")) if g else None
                     for g in got]  # fmt: skip
            other_text = " / ".join(f"{100 * o:.2f}" for o in other if o is not None) or "-"
            seconds = f"{got[0]['seconds']:.0f}" if got[0] else "-"
            label = Run(network, "", rule, h, head).label
            lines.append(f"| {network} | {label} | {accuracy[0]} | {accuracy[1]} | {other_text} "
                         f"| {seconds} | {PAPER.get(rule, '')} |")  # fmt: skip
    lines += [
        "",
        "Other prediction: forward-forward's label with the most goodness over blocks 2.. "
        "(the table's main column is its one-pass linear readout); scalable forward-forward's "
        "goodness averaged over the blocks (the main column is the last block's).",
        "",
        "## In a pipeline (P = 4 stages, one block each, m = 16, simulated with costs measured "
        "here)",
        "",
        "| network | rule | schedule | forward ms/block | update or backward ms/block "
        "| step ms | speed vs BP-1F1B |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r["network"], r["rule"], r["mode"], f"{r['forward_ms']:.2f}",
                 f"{r['update_ms']:.2f}", f"{r['step_ms']:.2f}", f"{r['vs_bp']:.2f}x")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    runs = [Run(n, d, rule, h, head) for n, rules in RULES.items() if n in args.networks
            for d in args.datasets for rule, h, head in rules]  # fmt: skip
    items = [(run, run_config(run, args)) for run in runs]
    started = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.workers) as pool:
        for result in pool.map(_train, items):
            results.append(result)
            console.print(f"{result['network']} {result['dataset']} {result['rule']} "
                          f"h={result['horizon']}: {100 * result['accuracy']:.2f} % "
                          f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    rows = pipeline_rows(args)
    text = report(results, rows, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"runs": results, "pipeline": rows}))
    Path(args.doc).write_text(text)
    console.print(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/rules-study")
    parser.add_argument("--doc", default="docs/rules.md", help="where the report is written")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--width", type=int, default=500, help="MLP width (the papers: 2000)")
    parser.add_argument("--epochs", type=int, default=3, help="MLP epochs")
    parser.add_argument("--conv-epochs", type=int, default=1, help="ResNet epochs")
    parser.add_argument("--max-steps", type=int, default=0, help="cap per run (0: none)")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
