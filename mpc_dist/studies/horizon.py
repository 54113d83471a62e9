"""`mpc-dist horizon-study`: what the horizon costs and buys, measured (docs/horizon-study.md).

Residual MLPs (T = 8 and 16) and a tiny ViT (T = 4) on MNIST and Fashion-MNIST, h in
{1, 2, T/4, T/2, T}, both rules, several seeds: final test accuracy (mean and spread), peak
activation memory (the engine's accounting), and the steps and simulated pipeline time (P = T
stages, m = T microbatches, sync, the block's F/B/W costs measured here) to reach a target
accuracy, against back-propagation. Then the selector's choice for each objective against the
best setting in hindsight, and the puzzle runs (accuracy not monotone in h). One process per
worker; a run already finished under --out is read back, not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from ..config import Config, HorizonConfig
from ..console import console
from ..core import HorizonEngine, Plan
from ..core.costs import middle_block_costs
from ..horizon import Candidate, choose, step_seconds
from ..models import build_model
from ..parallel import Costs, ScheduleSpec, stage_ranges, uniform_partition
from ..train import load_dataset, open_run, train
from ..train.selection import select_horizon, starting_model
from .common import (
    TINY_VIT,
    evaluations,
    in_processes,
    load_final_weights,
    num_blocks,
    study_config,
    train_once,
)

MODELS = {  # name -> overrides of configs/quickstart.yaml
    "mlp8": ["model.num_blocks=8"],
    "mlp16": ["model.num_blocks=16"],
    "vit4": TINY_VIT,
}
PUZZLE_HORIZONS = (1, 2, 3, 4, 8)
VARIANTS = {  # the puzzle's variations, one explanation each
    "shared": [],
    "aux": ["model.head=aux"],
    "constant": ["optim.schedule=constant"],
    "sgd": ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"],
    "epochs3": ["train.epochs=3"],
}
PENALTY = 0.2  # tradeoff: a step as long as back-propagation's costs 0.2 of its progress
MIN_ALIGNMENT, MIN_PROGRESS = 0.5, 0.95  # speed: what the selector asks for (the defaults)
TOLERANCE = 0.01  # speed in hindsight: the fastest within 1 point of back-propagation


@dataclasses.dataclass(frozen=True)
class Run:
    model: str
    dataset: str
    rule: str
    horizon: int
    seed: int
    variant: str = ""  # puzzle runs: a key of VARIANTS

    @property
    def name(self) -> str:
        extra = f"_{self.variant}" if self.variant else ""
        return f"{self.model}_{self.dataset}_{self.rule}_h{self.horizon}_s{self.seed}{extra}"


def horizons(T: int) -> list[int]:
    return sorted({h for h in (1, 2, T // 4, T // 2, T) if h >= 1})


def depth(model: str) -> int:
    return num_blocks(MODELS[model])


def settings(T: int) -> list[tuple[str, int]]:
    """Both rules at every horizon; shrinking at h = 1 and T is receding's plan again."""
    return sorted(
        {same_plan(rule, h, T) for h in horizons(T) for rule in ("receding", "shrinking")},
        key=lambda s: (s[1], s[0]),
    )


def study_runs(args) -> list[Run]:
    return [
        Run(model, dataset, rule, h, seed)
        for model in args.models
        for dataset in args.datasets
        for rule, h in settings(depth(model))
        for seed in range(args.seeds)
    ]


def puzzle_runs() -> list[Run]:
    """The quickstart network on MNIST, receding, h = 1, 2, 3, 4, 8, seeds 0 and 1, under each
    variant (the shared-head one is the puzzle as reported, and shares the study's runs)."""
    return [
        Run("mlp8", "mnist", "receding", h, seed, "" if variant == "shared" else variant)
        for variant in VARIANTS
        for h in PUZZLE_HORIZONS
        for seed in (0, 1)
    ]


def run_config(run: Run, args) -> Config:
    settings = [
        *MODELS[run.model],
        f"data.dataset={run.dataset}",
        f"horizon.rule={run.rule}",
        f"horizon.horizon={run.horizon}",
        f"train.seed={run.seed}",
        f"train.epochs={args.epochs}",
        f"train.max_steps={args.max_steps}",
        f"train.eval_every={args.eval_every}",
    ]
    return study_config(settings, args.out, run.name, VARIANTS.get(run.variant, []))


def _train(item: tuple[Run, Config]) -> dict:
    """Train one run (or read back its result when an earlier study finished it)."""
    run, config = item

    def record() -> dict:
        train(config)
        evals = [(r["step"], r["accuracy"]) for r in evaluations(config)]
        return {**dataclasses.asdict(run), "accuracy": evals[-1][1], "evals": evals}

    return train_once(config, record)


def execute(runs: list[Run], args) -> list[dict]:
    items = [(run, run_config(run, args)) for run in runs]
    results = []
    for (run, _), result, seconds in in_processes(_train, items, args.workers):
        results.append(result)
        console.print(
            f"[{len(results)}/{len(items)}] {run.name}: "
            f"{100 * result['accuracy']:.2f}%  ({seconds:.0f} s)"
        )
    return results


def readout(run: Run, args) -> list[float]:
    """Test accuracy of the head read at every state x(1) .. x(T) of a finished run (its own
    head there: the shared one, or the aux heads): which states the plan made readable."""
    config = run_config(run, args)
    data = load_dataset(run.dataset, "test", None, 0, 0)
    meta = build_model(config.model, data.input_shape, data.num_classes, device="meta")
    whole = load_final_weights(config, starting_model(config, meta))
    correct = [0] * whole.num_blocks
    with torch.no_grad():
        for x, y in zip(data.inputs.split(1000), data.targets.split(1000), strict=True):
            for t in range(whole.num_blocks):
                x = whole.block_forward(t, x)
                head, _ = whole.loss_head(t + 1)
                correct[t] += int((head(x).argmax(-1) == y).sum())
    return [c / len(data.targets) for c in correct]


def costs(model: str, dataset: str, args) -> dict:
    """Per (rule, h): peak activation MiB (a minibatch of 128 through the engine) and the
    simulated time per minibatch on P = T stages, m = T microbatches, with the middle block's
    measured F, B and W."""
    config = run_config(Run(model, dataset, "receding", 1, 0), args)
    data = load_dataset(dataset, "train", None, 0, 0)
    whole = starting_model(
        config, build_model(config.model, data.input_shape, data.num_classes, device="meta")
    )
    T = whole.num_blocks
    x, y = data.inputs[:128], data.targets[:128]
    block = Costs(**dataclasses.asdict(middle_block_costs(whole, x[: 128 // T])), latency=2e-5)
    out = {}
    for rule, h in settings(T):
        plan = Plan(rule, h, T)
        engine = HorizonEngine(whole, plan)
        engine.train_microbatch(x, y)
        whole.zero_grad(set_to_none=True)
        step = step_seconds(plan, stage_ranges(uniform_partition(T, T)), ScheduleSpec(T), block)
        out[rule, h] = {"peak_mib": engine.memory.peak_bytes / 2**20, "step_ms": 1000 * step}
    return out


def summarise(results: list[dict], cost: dict, model: str, dataset: str) -> list[dict]:
    """A row per (rule, h): accuracy over seeds, memory, step time, and the steps and simulated
    time (median over seeds; a seed that never gets there counts as never) to the target: the
    worst setting's mean final accuracy, rounded down to a whole percent."""
    runs = {
        key: [
            r
            for r in results
            if not r["variant"]
            and (r["model"], r["dataset"], r["rule"], r["horizon"]) == (model, dataset, *key)
        ]
        for key in cost
    }
    worst = min(statistics.fmean(r["accuracy"] for r in rs) for rs in runs.values())
    target = math.floor(worst * 100) / 100
    rows, bp = [], cost["receding", depth(model)]
    for (rule, h), c in cost.items():
        accuracies = [r["accuracy"] for r in runs[rule, h]]
        reach = [next((s for s, a in r["evals"] if a >= target), math.inf) for r in runs[rule, h]]
        steps = statistics.median(reach)
        steps = None if math.isinf(steps) else steps
        rows.append(
            {
                "model": model,
                "dataset": dataset,
                "rule": rule,
                "horizon": h,
                "accuracy_mean": statistics.fmean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "peak_mib": c["peak_mib"],
                "step_ms": c["step_ms"],
                "speed_vs_bp": bp["step_ms"] / c["step_ms"],
                "target": target,
                "steps_to_target": steps,
                "time_to_target_s": steps * c["step_ms"] / 1000 if steps is not None else None,
            }
        )
    return rows


def measurements(model: str, dataset: str, args) -> tuple[dict, list[Candidate]]:
    """``costs`` and the selector's candidates at the start, measured once per study folder
    (``measured_<model>_<dataset>.json``): a study called again reads them back, as it reads
    back its finished runs."""
    path = Path(args.out) / f"measured_{model}_{dataset}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        cost = {(c["rule"], c["horizon"]): c["cost"] for c in saved["costs"]}
        return cost, [Candidate(**c) for c in saved["candidates"]]
    cost, candidates = costs(model, dataset, args), _candidates_at_start(model, dataset, args)
    saved = {
        "costs": [{"rule": r, "horizon": h, "cost": v} for (r, h), v in cost.items()],
        "candidates": [dataclasses.asdict(c) for c in candidates],
    }
    path.write_text(json.dumps(saved, indent=1))
    return cost, candidates


def selections(
    rows: list[dict], candidates: list[Candidate], model: str, dataset: str
) -> list[dict]:
    """The selector's choice per objective (measured at the starting weights of seed 0, for the
    study's pipeline: P = T stages, m = T microbatches) against the best setting in hindsight
    under the same constraint. The memory budget is the median of the candidates' memory."""
    T = depth(model)
    memory = {same_plan(c.rule, c.horizon, T): c.memory_mib for c in candidates}
    for row in rows:  # what the selector measured at the start, beside what the runs reached
        c = next(
            c
            for c in candidates
            if same_plan(c.rule, c.horizon, T) == (row["rule"], row["horizon"])
        )
        row["cos2"], row["progress"] = c.cos2, c.progress
    budget = statistics.median(memory.values())
    by_setting = {(r["rule"], r["horizon"]): r for r in rows}
    bp = by_setting["receding", T]
    hindsight = {  # objective -> (constraint, value) on the study's rows
        "memory": (
            lambda r: memory[r["rule"], r["horizon"]] <= budget,
            lambda r: r["accuracy_mean"],
        ),
        "speed": (
            lambda r: r["accuracy_mean"] >= bp["accuracy_mean"] - TOLERANCE,
            lambda r: r["speed_vs_bp"],
        ),
        "tradeoff": (
            lambda r: True,
            lambda r: (
                (r["accuracy_mean"] - 0.1) / (bp["accuracy_mean"] - 0.1)
                - PENALTY / r["speed_vs_bp"]
            ),
        ),
    }
    out = []
    for objective, (allowed, value) in hindsight.items():
        choice, reason = choose(candidates, objective, budget, MIN_ALIGNMENT, PENALTY, MIN_PROGRESS)
        chosen = by_setting[same_plan(choice.rule, choice.horizon, T)]
        best = max((r for r in rows if allowed(r)), key=value)
        out.append(
            {
                "model": model,
                "dataset": dataset,
                "objective": objective,
                "chosen": f"{chosen['rule']} h={chosen['horizon']}",
                "chosen_accuracy": chosen["accuracy_mean"],
                "chosen_speed": chosen["speed_vs_bp"],
                "best": f"{best['rule']} h={best['horizon']}",
                "best_accuracy": best["accuracy_mean"],
                "best_speed": best["speed_vs_bp"],
                "seed_spread": max(r["accuracy_std"] for r in rows),
                "reason": reason,
            }
        )
    return out


def _candidates_at_start(model: str, dataset: str, args) -> list[Candidate]:
    """Every candidate (rule, h) as the selector measures it at seed 0's starting weights, for
    the study's pipeline (P = T stages, m = T microbatches)."""
    base = run_config(Run(model, dataset, "receding", 1, 0), args)
    T = depth(model)
    config = dataclasses.replace(
        base,
        horizon=dataclasses.replace(base.horizon, progress_steps=args.progress_steps),
        pipeline=dataclasses.replace(base.pipeline, stages=T),
        data=dataclasses.replace(base.data, num_microbatches=T),
    )
    meta, source, _ = open_run(config)
    _, selection = select_horizon(config, starting_model(config, meta), source)
    return selection.candidates


def same_plan(rule: str, h: int, T: int) -> tuple[str, int]:
    """Shrinking at h = 1 and h = T is receding's plan."""
    return (rule if 1 < h < T else "receding", h)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        type=lambda s: s.split(","),
        default=list(MODELS),
        help=f"of {', '.join(MODELS)}",
    )
    parser.add_argument(
        "--datasets", type=lambda s: s.split(","), default=["mnist", "fashion_mnist"]
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="cut every run short (smoke)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    parser.add_argument(
        "--progress-steps",
        type=int,
        default=HorizonConfig.progress_steps,
        help="training steps per candidate of the selector's loss-progress score",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--no-puzzle",
        dest="puzzle",
        action="store_false",
        help="skip the puzzle runs (mlp8 on MNIST under five variants)",
    )
    parser.add_argument("--out", default="runs/horizon-study")


def main(args: argparse.Namespace) -> None:
    from .plots import horizon_accuracy_memory, time_to_accuracy

    out, started = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs = list(dict.fromkeys(study_runs(args) + (puzzle_runs() if args.puzzle else [])))
    console.print(f"horizon study: {len(runs)} runs on {args.workers} workers -> {out}")
    results = execute(runs, args)
    for result in results:
        if result["model"] == "mlp8" and result["variant"] in ("", "aux") and args.puzzle:
            run = Run(*(result[f.name] for f in dataclasses.fields(Run)))
            if run.dataset == "mnist" and run.rule == "receding" and run.horizon in PUZZLE_HORIZONS:
                result["readout"] = readout(run, args)
    rows, chosen = [], []
    for model in args.models:
        for dataset in args.datasets:
            cost, candidates = measurements(model, dataset, args)
            mine = summarise(results, cost, model, dataset)
            rows += mine
            chosen += selections(mine, candidates, model, dataset)
            name = f"{model}_{dataset}"
            horizon_accuracy_memory(mine, out / f"accuracy_memory_{name}.png", name)
            time_to_accuracy(
                results, mine, out / f"time_to_accuracy_{name}.png", mine[0]["target"], name
            )
    minutes = (time.perf_counter() - started) / 60
    report = {
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
        "minutes": minutes,
        "rows": rows,
        "selections": chosen,
        "runs": results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(rows, chosen, results, minutes))
    console.print(f"wrote {out}/results.md, results.json and the plots ({minutes:.1f} min)")


def markdown(rows: list[dict], chosen: list[dict], results: list[dict], minutes: float) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        f"Measured in {minutes:.0f} minutes.",
        "",
        "| model | data | rule | h | cos^2 at start | progress at start | accuracy % "
        "| peak activations MiB | step ms (P = T) | speed vs BP | target % | steps to target "
        "| time to target s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['rule']} | {r['horizon']} | "
            f"{r['cos2']:.3f} | {num(r['progress'], '.3f')} | "
            f"{pct(r['accuracy_mean'])} ± {pct(r['accuracy_std'])} | {r['peak_mib']:.2f} | "
            f"{r['step_ms']:.2f} | {r['speed_vs_bp']:.2f} | {pct(r['target'])} | "
            f"{num(r['steps_to_target'], '.0f')} | {num(r['time_to_target_s'], '.2f')} |"
        )
    lines += [
        "",
        "| model | data | objective | chosen | accuracy % | speed vs BP | best in hindsight | "
        "accuracy % | speed vs BP | seed spread (std) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in chosen:
        lines.append(
            f"| {s['model']} | {s['dataset']} | {s['objective']} | {s['chosen']} | "
            f"{pct(s['chosen_accuracy'])} | {s['chosen_speed']:.2f} | {s['best']} | "
            f"{pct(s['best_accuracy'])} | {s['best_speed']:.2f} | {pct(s['seed_spread'])} |"
        )
    lines += puzzle_tables(results, pct)
    return "\n".join(lines) + "\n"


def puzzle_tables(results: list[dict], pct) -> list[str]:
    """The puzzle's variants by h and seed, and the per-state readouts (where they were run)."""
    lines: list[str] = []
    puzzle: dict = {}
    for r in results:
        if (r["model"], r["dataset"], r["rule"]) == ("mlp8", "mnist", "receding") and (
            r["seed"] in (0, 1) and r["horizon"] in PUZZLE_HORIZONS
        ):
            by_h = puzzle.setdefault(r["variant"] or "shared", {})
            by_h.setdefault(r["horizon"], {})[r["seed"]] = r
    if len(puzzle) > 1:  # the puzzle's variants were run
        hs = sorted({h for by_h in puzzle.values() for h in by_h})
        lines += [
            "",
            "Puzzle (mlp8, MNIST, receding; test accuracy %, seed 0 / seed 1):",
            "",
            "| variant | " + " | ".join(f"h = {h}" for h in hs) + " |",
            "|---|" + "---|" * len(hs),
        ]
        for variant, by_h in puzzle.items():
            cells = [" / ".join(pct(by_h[h][s]["accuracy"]) for s in sorted(by_h[h])) for h in hs]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    readouts: dict = {}
    for r in results:
        if "readout" in r:
            readouts.setdefault((r["variant"] or "shared", r["horizon"]), []).append(r["readout"])
    if readouts:
        T = len(next(iter(readouts.values()))[0])
        lines += [
            "",
            "Readout (the head read at every state; test accuracy %, mean over seeds):",
            "",
            "| variant | h | " + " | ".join(f"x({s})" for s in range(1, T + 1)) + " |",
            "|---|---|" + "---|" * T,
        ]
        for (variant, h), values in sorted(readouts.items()):
            means = [statistics.fmean(v[s] for v in values) for s in range(T)]
            lines.append(f"| {variant} | {h} | " + " | ".join(pct(a) for a in means) + " |")
    return lines
