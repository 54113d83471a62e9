"""`mpc-dist rules-study`: the seed papers' rules next to back-propagation and MPC on the same
networks (docs/rules.md).

Forward-forward, forward gradient and PEPITA train a plain 4 x 500 ReLU MLP, forward-forward
also its paper's 4 x 2000 (MNIST) and PEPITA its 1 x 1024, scalable forward-forward a small
ResNet; back-propagation
(h = T) and MPC (receding h = 1, 2) train the same networks with the same heads. MNIST and
Fashion-MNIST, one process per run, two at a time. Then each rule's per-block costs on this
machine, and what they give a P = 4 pipeline (simulated with those costs) against BP-1F1B.
A run already finished under --out is read back, not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ..config import Config, load_config
from ..console import console
from ..core import EngineOptions, Plan
from ..models import build_model
from ..parallel import Costs, ScheduleSpec, generate, simulate, stage_ranges, uniform_partition
from ..rules import make_engine, predict_by_average, predict_by_goodness
from ..train import TrainingError, load_dataset, train
from .common import (
    evaluations,
    in_processes,
    load_final_weights,
    num_blocks,
    replace_between,
    study_config,
    train_once,
)

NETWORKS = {  # network -> overrides of configs/quickstart.yaml
    "mlp": ["model.name=relu_mlp", "model.num_blocks=4", "model.width=500"],
    "mlp2000": ["model.name=relu_mlp", "model.num_blocks=4", "model.width=2000"],  # FF's
    "mlp1024": ["model.name=relu_mlp", "model.num_blocks=1", "model.width=1024"],  # PEPITA's
    "resnet": ["model.name=resnet_small", "model.num_blocks=4", "model.width=8"],
}
ADAM_3E4 = ["optim.lr=0.0003"]  # forward gradients are noisy: 1e-3 learns worse (72 vs 47 %)
PEPITA_SGD = [
    "optim.name=sgd",
    "optim.lr=0.01",
    "optim.momentum=0.9",
    "optim.schedule=constant",
    "optim.weight_decay=0",
    "optim.warmup_steps=0",
    "data.batch_size=64",
]  # the paper's
RULES = {  # network -> (rule, horizon (4 = T: back-propagation), head, more overrides)
    "mlp": [
        ("ff", 1, "shared", []),
        ("forward_gradient", 1, "aux", ADAM_3E4),
        ("pepita", 1, "shared", PEPITA_SGD),
        ("receding", 1, "aux", []),
        ("receding", 2, "aux", []),
        ("receding", 4, "aux", []),
    ],
    "mlp2000": [("ff", 1, "shared", ["optim.lr=0.0001"])],  # 1e-3 collapses at 2000 units
    "mlp1024": [("pepita", 1, "shared", PEPITA_SGD), ("receding", 1, "shared", [])],
    "resnet": [
        ("sff", 1, "goodness", []),
        ("receding", 1, "goodness", []),
        ("receding", 2, "goodness", []),
        ("receding", 4, "goodness", []),
    ],
}
PAPER = {  # rule -> what its paper reports on MNIST (test error), and on what
    "ff": "1.36 % (4 x 2000, 60 epochs)",
    "forward_gradient": "2.55 % (LG-FG-A, LocalMixer M/1/16)",
    "pepita": "not recovered (FC nets; CIFAR-10 3072-1024-10: 52.6 % accuracy)",
    "sff": "no MNIST figure (CIFAR-10 / ImageNette; 'comparable to BP')",
}


@dataclasses.dataclass(frozen=True)
class Run:
    network: str
    dataset: str
    rule: str
    horizon: int
    head: str
    extra: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.network}_{self.dataset}_{self.rule}_h{self.horizon}"

    @property
    def label(self) -> str:
        if self.rule == "receding":
            bp = self.horizon == depth(self.network)
            return "back-propagation" if bp else f"MPC h = {self.horizon}"
        return self.rule


def depth(network: str) -> int:
    return num_blocks(NETWORKS[network])


def epochs(network: str, args) -> int:
    return {"mlp2000": args.paper_epochs, "resnet": args.conv_epochs}.get(network, args.epochs)


def run_config(run: Run, args) -> Config:
    settings = [
        *NETWORKS[run.network],
        f"model.head={run.head}",
        f"data.dataset={run.dataset}",
        f"horizon.rule={run.rule}",
        f"horizon.horizon={run.horizon}",
        f"train.epochs={epochs(run.network, args)}",
        f"train.max_steps={args.max_steps}",
    ]
    return study_config(settings, args.out, run.name, run.extra)


def _train(item: tuple[Run, Config]) -> dict:
    """Train one run (or read back its result when an earlier study finished it)."""
    run, config = item

    def record() -> dict:
        started = time.perf_counter()
        try:
            result = {"accuracy": train(config)["test accuracy"], **_other_predictions(run, config)}
        except TrainingError as error:  # diverged: the last evaluation before it, and why
            result = {"accuracy": 0.0, "diverged": str(error)}
        evals = [r["accuracy"] for r in evaluations(config)]
        result.update(
            dataclasses.asdict(run),
            seconds=time.perf_counter() - started,
            evals=evals,
            best=max(evals, default=0.0),
        )
        return result

    return train_once(config, record)


def _other_predictions(run: Run, config: Config) -> dict:
    """Forward-forward's goodness over labels, scalable forward-forward's averaged votes."""
    if run.rule not in ("ff", "sff"):
        return {}
    test = load_dataset(config.data.dataset, "test")
    model = build_model(config.model, test.input_shape, test.num_classes)
    load_final_weights(config, model)
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


def block_costs(network: str) -> dict[tuple[str, int], tuple[float, float]]:
    """Seconds per block of each rule of ``network`` on this machine (one thread, a microbatch
    of 256, the median of 30 repetitions, the rules taking turns so drift hits all alike): the
    forward action, and everything after it (a local rule's updates, BP's backward, PEPITA's
    second pass)."""
    torch.set_num_threads(1)
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    engines = {}
    for rule, h, head, _ in RULES[network]:
        spec = load_config(None, [*NETWORKS[network], f"model.head={head}"]).model
        model = build_model(spec, (1, 28, 28), 10, seed=0)
        engines[(rule, h)] = (
            model,
            make_engine(model, Plan(rule, h, model.num_blocks), EngineOptions(track_memory=False)),
        )
    times: dict[tuple[str, int], list[tuple[float, float]]] = {key: [] for key in engines}
    for i in range(33):
        for key, (model, engine) in engines.items():
            start = time.perf_counter()
            result = engine.forward(i, x, y, eager=False)
            middle = time.perf_counter()
            if engine.plan.top_down:
                engine.second_pass(i, result.top_down)
            for s in reversed(engine.plan.loss_points):
                engine.backward(i, s)
            if i >= 3:  # warm-up
                times[key].append((middle - start, time.perf_counter() - middle))
            model.zero_grad(set_to_none=True)
    T = depth(network)
    median = lambda values: statistics.median(values) / T
    return {
        key: (median([f for f, _ in got]), median([a for _, a in got]))
        for key, got in times.items()
    }


def pipeline_rows(networks: list[str]) -> list[dict]:
    """Each rule's step on a P = 4 pipeline (one block per stage), m = 16, from measured costs:
    local rules have no input-gradient work, BP's backward is split evenly into input and weight
    gradients (as the bubble bench does), PEPITA's second pass is a forward plus its updates."""
    rows, ranges = [], stage_ranges(uniform_partition(4, 4))
    for network in [n for n in ("mlp", "resnet") if n in networks]:
        measured, mine = block_costs(network), []
        for rule, h, head, _ in RULES[network]:
            forward, after = measured[(rule, h)]
            plan = Plan(rule, h, 4)
            if plan.is_local:
                costs = Costs(forward=forward, input_grad=0.0, weight_grad=after)
            elif plan.top_down:
                costs = Costs(forward=forward, input_grad=0.0, weight_grad=after - forward)
            else:
                costs = Costs(forward=forward, input_grad=after / 2, weight_grad=after / 2)
            policy = "1f1b" if h == 4 and rule == "receding" else "horizon"
            for mode in ("sync", "async") if policy == "horizon" else ("sync",):
                minibatches = 8 if mode == "async" else 1
                schedule = generate(plan, ranges, ScheduleSpec(16, mode, policy), minibatches)
                step = max(e.end for e in simulate(schedule, costs)) / schedule.num_minibatches
                mine.append(
                    {
                        "network": network,
                        "rule": Run(network, "", rule, h, head).label,
                        "mode": mode if policy == "horizon" else "1F1B",
                        "forward_ms": 1e3 * forward,
                        "after_ms": 1e3 * after,
                        "step_ms": 1e3 * step,
                    }
                )
        base = next(r["step_ms"] for r in mine if r["mode"] == "1F1B")
        rows += [{**r, "vs_bp": base / r["step_ms"]} for r in mine]
    return rows


BEGIN, END = "<!-- results: mpc-dist rules-study -->", "<!-- end of results -->"


def write_report(path: Path, text: str) -> None:
    """Replace the results between the markers, keeping what is written around them."""
    replace_between(path, BEGIN, END, text, "# Learning rules")


def _accuracy(result: dict) -> str:
    """The final test accuracy, and the best epoch's where training collapsed after it."""
    text = f"{100 * result['accuracy']:.2f}"
    if "diverged" in result:  # the weights went non-finite: training stopped there
        return f"diverged (best evaluation before: {100 * result['best']:.2f})"
    if result["best"] - result["accuracy"] > 0.05:
        return f"{text} (collapsed; best epoch {100 * result['best']:.2f})"
    return text


def report(results: list[dict], rows: list[dict], args) -> str:
    lines = [
        f"Produced by `mpc-dist rules-study` (one seed; the 4 x 500 MLP and PEPITA's 1 x 1024 "
        f"{args.epochs} epochs, forward-forward's 4 x 2000 {args.paper_epochs} epochs, the ResNet "
        f"(4 basic blocks, 8/16 channels) {args.conv_epochs} epochs; 2-core CPU, no GPU).",
        "",
        "### Test accuracy (%)",
        "",
        "| network | rule | MNIST | Fashion-MNIST | other prediction (MNIST / F-MNIST) "
        "| train s (MNIST) | paper (MNIST test error) |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["network"], r["rule"], r["horizon"], r["dataset"]): r for r in results}
    for network, rules in RULES.items():
        for rule, h, head, _ in rules:
            got = [by.get((network, rule, h, d)) for d in ("mnist", "fashion_mnist")]
            accuracy = [_accuracy(g) if g else "-" for g in got]
            other = [
                g.get("goodness_accuracy", g.get("average_vote_accuracy")) if g else None
                for g in got
            ]
            other_text = " / ".join(f"{100 * o:.2f}" for o in other if o is not None) or "-"
            seconds = f"{got[0]['seconds']:.0f}" if got[0] else "-"
            label = Run(network, "", rule, h, head).label
            lines.append(
                f"| {network} | {label} | {accuracy[0]} | {accuracy[1]} | {other_text} "
                f"| {seconds} | {PAPER.get(rule, '')} |"
            )
    lines += [
        "",
        "Other prediction: forward-forward's label with the most goodness over blocks 2..4 "
        "(the main column is its one-pass linear readout); scalable forward-forward's goodness "
        "averaged over the blocks (the main column is the last block's).",
        "",
        "### In a pipeline (P = 4 stages, one block each, m = 16, simulated with costs measured "
        "here)",
        "",
        "| network | rule | schedule | forward ms/block | after the forward ms/block "
        "| step ms | speed vs BP-1F1B |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (
            r["network"],
            r["rule"],
            r["mode"],
            f"{r['forward_ms']:.2f}",
            f"{r['after_ms']:.2f}",
            f"{r['step_ms']:.2f}",
            f"{r['vs_bp']:.2f}x",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    runs = [
        Run(n, d, rule, h, head, tuple(extra))
        for n, rules in RULES.items()
        if n in args.networks
        for d in args.datasets
        for rule, h, head, extra in rules
        if n != "mlp2000" or d == "mnist"
    ]
    runs.sort(key=lambda run: run.network != "mlp2000")  # the longest first
    items = [(run, run_config(run, args)) for run in runs]
    results = []
    for _, result, seconds in in_processes(_train, items, args.workers):
        results.append(result)
        console.print(
            f"{result['network']} {result['dataset']} {result['rule']} h={result['horizon']}: "
            f"{100 * result['accuracy']:.2f} % ({seconds:.0f} s)"
        )
    rows = pipeline_rows(args.networks)
    text = report(results, rows, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"runs": results, "pipeline": rows}))
    write_report(Path(args.doc), text)
    console.print(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/rules-study")
    parser.add_argument("--doc", default="docs/rules.md", help="where the report is written")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the 4 x 500 MLP")
    parser.add_argument("--paper-epochs", type=int, default=8, help="epochs of FF's 4 x 2000")
    parser.add_argument("--conv-epochs", type=int, default=2, help="ResNet epochs")
    parser.add_argument("--max-steps", type=int, default=0, help="cap per run (0: none)")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
