"""`mpc-dist rules-study --paper`: each seed paper's rule at its paper's own recipe (network,
optimiser, schedule, epochs), one run at a time, on MNIST (docs/rules.md, "At the papers'
recipes").

A run resumes from its last checkpoint when the study is started again (checkpoints every
``--checkpoint-every`` steps and at epoch ends), prints its test accuracy after every epoch, and
leaves ``result.json`` when done; a finished run is read back, not trained again. The report
(tables, and a plot of test accuracy per epoch of every run) replaces the block between its
markers in ``--doc``. ``--recipe-epochs name=N`` shortens a recipe to N epochs (its learning-rate
schedule is compressed to them); the report says how many epochs each run had.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..config import Config, load_config
from ..console import console
from ..models import build_model
from ..rules import predict_by_goodness
from ..train import (
    Callback,
    TrainingError,
    load_dataset,
    load_run_weights,
    num_batches,
    train,
)
from ..train.metrics import MetricsLogger


@dataclasses.dataclass(frozen=True)
class Recipe:
    label: str  # the row's name in the report
    config: str  # the shipped config of the recipe
    overrides: tuple[str, ...] = ()
    paper: str = ""  # what the paper reports on MNIST (test accuracy) and where
    target: str = ""  # what this repository aims at (issue #20)
    epochs: int | None = None  # a shortened run of the recipe (its schedule compressed)
    default: bool = True  # trained by a plain --paper (else only when named in --recipes)


RECIPES: dict[str, Recipe] = {
    "ff": Recipe(
        "forward-forward, 4 x 2000, peer normalisation",
        "configs/ff_mnist.yaml",
        paper="98.64 % (1.36 % error, 60 epochs; Hinton 2022, section 3.3)",
        target=">= 98.4 %",
    ),
    "ff_scaled": Recipe(  # docs/rules.md, "The first epoch of forward-forward 4 x 2000"
        "forward-forward, 4 x 2000, the codes' rate carried to 2000 units",
        "configs/ff_mnist.yaml",
        ("optim.lr=0.0005",),
        target=">= 98.4 %",
        default=False,
    ),
    "ff_500_peer": Recipe(
        "forward-forward, 4 x 500, peer normalisation",
        "configs/ff_mnist.yaml",
        ("model.width=500",),
    ),
    "ff_500_plain": Recipe(
        "forward-forward, 4 x 500, no peer normalisation",
        "configs/ff_mnist.yaml",
        ("model.width=500", "rules.ff_peer_normalisation=0", "rules.ff_straight_through=false"),
    ),
    "forward_gradient": Recipe(
        "forward gradient LG-FG-A, LocalMixer M/1/16",
        "configs/forward_gradient_mnist.yaml",
        paper="97.45 % (2.55 % error; Ren et al. 2023, Table 3)",
        target=">= 97.2 %",
    ),
    "pepita": Recipe(
        "PEPITA, 1 x 1024",
        "configs/pepita_mnist.yaml",
        paper="98.01 % (Dellaferrera & Kreiman 2022, Table 1)",
        target="within 0.5 point",
    ),
    "forward_gradient_12ep": Recipe(
        "forward gradient LG-FG-A, LocalMixer M/1/16, 12 epochs",
        "configs/forward_gradient_mnist.yaml",
        epochs=12,
        default=False,
    ),
    "forward_gradient_32ep": Recipe(
        "forward gradient LG-FG-A, LocalMixer M/1/16, 32 epochs",
        "configs/forward_gradient_mnist.yaml",
        epochs=32,
        default=False,
    ),
    "pepita_12ep": Recipe(
        "PEPITA, 1 x 1024, 12 epochs",
        "configs/pepita_mnist.yaml",
        epochs=12,
        default=False,
    ),
    "pepita_deep": Recipe(
        "PEPITA, 4 x 500, stabilisers",
        "configs/pepita_mnist_deep.yaml",
        target="no divergence, >= 97 %",
    ),
    "pepita_deep_plain": Recipe(
        "PEPITA, 4 x 500, no stabilisers",
        "configs/pepita_mnist_deep.yaml",
        ("optim.weight_decay=0", "rules.pepita_normalise=false", "rules.pepita_mirror_lr=0"),
    ),
}
BEGIN, END = "<!-- results: mpc-dist rules-study --paper -->", "<!-- end of paper results -->"


class EpochPrinter(Callback):
    """Prints a run's test accuracy after every epoch (the study's progress), and keeps the
    run's train time in ``timing`` (one entry per sitting) at every evaluation and checkpoint,
    so a sitting that is stopped keeps the time up to its last checkpoint."""

    def __init__(self, name: str, steps_per_epoch: int, epochs: int, timing: Path) -> None:
        self.name, self.steps_per_epoch, self.epochs = name, steps_per_epoch, epochs
        self.timing = timing
        self.spent = json.loads(timing.read_text()) if timing.exists() else []
        self.started = time.perf_counter()

    def record(self) -> float:
        """This sitting's seconds so far, written beside the earlier sittings'."""
        seconds = time.perf_counter() - self.started
        self.timing.parent.mkdir(parents=True, exist_ok=True)
        self.timing.write_text(json.dumps([*self.spent, seconds]))
        return seconds

    def after_checkpoint(self, step: int, path: Path) -> None:
        self.record()

    def after_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        epoch = step / self.steps_per_epoch
        console.print(
            f"{self.name}: epoch {epoch:g}/{self.epochs} test accuracy "
            f"{100 * metrics['accuracy']:.2f} % ({self.record():.0f} s)"
        )


def recipe_config(name: str, epochs: int | None, args: argparse.Namespace) -> Config:
    """The recipe's config; ``epochs`` shortens it, its warmup shortened in proportion."""
    recipe = RECIPES[name]
    more, epochs = [], epochs or recipe.epochs
    if epochs:
        paper = load_config(recipe.config, list(recipe.overrides))
        warmup = round(paper.optim.warmup_steps * epochs / paper.train.epochs)
        more = [f"train.epochs={epochs}", f"optim.warmup_steps={warmup}"]
    return load_config(
        recipe.config,
        [
            *recipe.overrides,
            *more,
            f"run.out_dir={args.paper_out}/runs",
            f"run.name={name}",
            f"run.checkpoint_every={args.checkpoint_every}",
            "run.progress=false",
            "run.tensorboard=false",
            "run.plot=false",
            f"train.max_steps={args.max_steps}",
        ],
    )


def run_recipe(name: str, config: Config) -> dict:
    """Train (or resume, or read back) one recipe's run; its result."""
    run_dir = config.run_dir
    done = run_dir / "result.json"
    if done.exists():
        result = {**json.loads(done.read_text()), "name": name}
        asked = (config.train.epochs, config.train.max_steps)
        if (result["epochs"], result["max_steps"]) == asked:
            return result
        done.unlink()  # another length was asked for: train on from where it stopped
    resume = any((run_dir / "checkpoints").glob("step_*"))
    timing = run_dir / "train_seconds.json"
    steps = num_batches(load_dataset(config.data.dataset, "train"), config.data.batch_size)
    printer = EpochPrinter(name, steps, config.train.epochs, timing)
    console.print(f"{name}: {'resuming' if resume else 'starting'} ({config.train.epochs} epochs)")
    result: dict = {
        "name": name,
        "epochs": config.train.epochs,
        "max_steps": config.train.max_steps,
    }
    try:
        summary = train(config, resume=resume, callbacks=[printer])
        result["accuracy"] = summary["test accuracy"]
    except TrainingError as error:  # diverged: the evaluations before it stand
        result.update(accuracy=0.0, diverged=str(error))
    printer.record()
    evals = [r for r in MetricsLogger.read(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    result.update(
        seconds=sum(json.loads(timing.read_text())),
        per_epoch=per_epoch(evals, steps),
        best=max((r["accuracy"] for r in evals), default=0.0),
        **other_predictions(config),
    )
    done.write_text(json.dumps(result))
    return result


def per_epoch(evals: list[dict], steps_per_epoch: int) -> list[float]:
    """The test accuracy at each epoch's end (a resumed run may have evaluated one twice)."""
    at = {r["epoch"]: r["accuracy"] for r in evals if r["step"] == r["epoch"] * steps_per_epoch}
    return [at[epoch] for epoch in sorted(at)]


def so_far(name: str, config: Config) -> dict | None:
    """A run's result without training: its result.json, or, for a run stopped part-way, the
    epochs it finished (``stopped``); None if it never started."""
    run_dir = config.run_dir
    if (run_dir / "result.json").exists():  # named by the recipe, whatever the run was called
        return {**json.loads((run_dir / "result.json").read_text()), "name": name}
    if not (run_dir / "metrics.jsonl").exists():
        return None
    steps = num_batches(load_dataset(config.data.dataset, "train"), config.data.batch_size)
    records = MetricsLogger.read(run_dir / "metrics.jsonl")
    by_epoch = per_epoch([r for r in records if r["kind"] == "eval"], steps)
    timing = run_dir / "train_seconds.json"
    seconds = sum(json.loads(timing.read_text())) if timing.exists() else 0.0
    if not seconds and records:  # still running: the time since its first record
        seconds = records[-1]["time"] - records[0]["time"]
    return {
        "name": name,
        "epochs": config.train.epochs,
        "max_steps": config.train.max_steps,
        "accuracy": by_epoch[-1] if by_epoch else 0.0,
        "per_epoch": by_epoch,
        "best": max(by_epoch, default=0.0),
        "seconds": seconds,
        "stopped": records[-1]["step"] if records else 0,
    }


def other_predictions(config: Config) -> dict:
    """Forward-forward's label with the most goodness over blocks 2.. (Hinton's prediction)."""
    if config.horizon.rule != "ff" or not (config.run_dir / "checkpoints").exists():
        return {}
    test = load_dataset(config.data.dataset, "test", standardise=config.data.standardise)
    model = build_model(config.model, test.input_shape, test.num_classes, seed=0)
    model.load_state_dict(load_run_weights(config.run_dir), strict=False)
    correct = 0
    torch.set_num_threads(1)
    for x, y in zip(test.inputs.split(1000), test.targets.split(1000), strict=True):
        scores = predict_by_goodness(model.eval(), x, test.num_classes)
        correct += int((scores.argmax(-1) == y).sum())
    return {"goodness_accuracy": correct / len(test)}


def plot(results: list[dict], path: Path) -> None:
    """Test accuracy after every epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for result in results:
        accuracies = [100 * a for a in result["per_epoch"]]
        if accuracies:
            axis.plot(
                range(1, len(accuracies) + 1),
                accuracies,
                marker=".",
                label=RECIPES[result["name"]].label,
            )
    axis.set(xlabel="epoch", ylabel="MNIST test accuracy (%)", ylim=(88, 100))
    axis.grid(alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _accuracy(result: dict) -> str:
    if "stopped" in result:
        return f"{100 * result['accuracy']:.2f} (stopped at step {result['stopped']})"
    if "diverged" in result:  # the epochs before it stand
        epochs = len(result["per_epoch"])
        before = f" (after {100 * result['per_epoch'][-1]:.2f})" if epochs else ""
        return f"diverged in epoch {epochs + 1}{before}"
    return f"{100 * result['accuracy']:.2f}"


def report(results: list[dict], plot_path: str) -> str:
    lines = [
        "Produced by `mpc-dist rules-study --paper` (one seed, MNIST, one process on a shared "
        "2-core CPU, no GPU).",
        "",
        "| run | epochs | test accuracy (%) | best epoch (%) | goodness over labels (%) "
        "| train time | paper | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        recipe = RECIPES[r["name"]]
        goodness = f"{100 * r['goodness_accuracy']:.2f}" if "goodness_accuracy" in r else "-"
        hours = r["seconds"] / 3600
        took = f"{hours:.1f} h" if hours >= 1 else f"{r['seconds'] / 60:.0f} min"
        best = f"{100 * r['best']:.2f}" if r["per_epoch"] else "-"
        lines.append(
            f"| {recipe.label} | {len(r['per_epoch'])} of {r['epochs']} "
            f"| {_accuracy(r)} | {best} | {goodness} | {took} "
            f"| {recipe.paper or '-'} | {recipe.target or '-'} |"
        )
    lines += ["", f"![test accuracy per epoch]({plot_path})", "", "After each epoch (%):", ""]
    for r in results:
        per_epoch = ", ".join(f"{100 * a:.2f}" for a in r["per_epoch"]) or "none finished"
        lines.append(f"* {RECIPES[r['name']].label}: {per_epoch}")
    return "\n".join(lines) + "\n"


def write_report(path: Path, text: str) -> None:
    """Replace the block between the markers (append it if there is none)."""
    old = path.read_text() if path.exists() else "# Learning rules\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        path.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])
    else:
        path.write_text(old.rstrip("\n") + f"\n\n{BEGIN}\n{text}{END}\n")


def main(args: argparse.Namespace) -> None:
    epochs = dict(item.split("=") for item in args.recipe_epochs)
    unknown = set(args.recipes) - set(RECIPES) or set(epochs) - set(RECIPES)
    if unknown:
        raise SystemExit(f"--recipes/--recipe-epochs: unknown {sorted(unknown)}; use {RECIPES}")
    torch.set_num_threads(args.threads)
    results = []
    for name in args.recipes:
        config = recipe_config(name, int(epochs[name]) if name in epochs else None, args)
        result = so_far(name, config) if args.report_only else run_recipe(name, config)
        if result is not None:
            results.append(result)
    out = Path(args.paper_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))
    doc = Path(args.doc)
    figure = doc.parent / "figures" / "rules_paper_accuracy.png"
    plot(results, figure)
    text = report(results, str(figure.relative_to(doc.parent)))
    write_report(doc, text)
    console.print(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --paper study's options (``mpc-dist rules-study --paper``)."""
    parser.add_argument(
        "--paper", action="store_true", help="each paper's own recipe (hours); resumes"
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=[name for name, r in RECIPES.items() if r.default],
        help=f"of --paper (default: all but {[n for n, r in RECIPES.items() if not r.default]})",
    )
    parser.add_argument(
        "--recipe-epochs",
        nargs="*",
        default=[],
        metavar="NAME=N",
        help="shorten a --paper recipe to N epochs (schedule compressed)",
    )
    parser.add_argument("--paper-out", default="runs/rules-paper", help="--paper's run folder")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps (--paper)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (--paper)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="--paper: write the report from the runs as they are, training nothing",
    )
