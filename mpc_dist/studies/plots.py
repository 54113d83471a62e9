"""The horizon study's pictures: accuracy and memory against h, accuracy against time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def horizon_accuracy_memory(rows: list[dict], path: Path, title: str = "") -> Path:
    """Like the paper's Fig. 3: test accuracy (mean, error bars = std over seeds) as lines,
    peak activation memory as bars, against h; one line and bar series per rule."""
    fig, ax_acc = plt.subplots(figsize=(7, 4.2))
    ax_mem = ax_acc.twinx()
    hs = sorted({r["horizon"] for r in rows})
    width = 0.38
    for i, (rule, colour) in enumerate((("receding", "#4C72B0"), ("shrinking", "#DD8452"))):
        mine = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["horizon"])
        if not mine:
            continue
        x = [hs.index(r["horizon"]) for r in mine]
        ax_mem.bar(
            [p + (i - 0.5) * width for p in x],
            [r["peak_mib"] for r in mine],
            width,
            color=colour,
            alpha=0.25,
            label=f"{rule} memory",
        )
        ax_acc.errorbar(
            x,
            [100 * r["accuracy_mean"] for r in mine],
            [100 * r["accuracy_std"] for r in mine],
            fmt="o-",
            color=colour,
            capsize=3,
            label=f"{rule} accuracy",
        )
    ax_acc.set_xticks(range(len(hs)), [str(h) for h in hs])
    ax_acc.set(xlabel="horizon h", ylabel="test accuracy (%)", title=title)
    ax_mem.set_ylabel("peak activation memory (MiB)")
    ax_acc.set_zorder(ax_mem.get_zorder() + 1)
    ax_acc.patch.set_visible(False)
    handles = ax_acc.get_legend_handles_labels()
    more = ax_mem.get_legend_handles_labels()
    ax_acc.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="lower right")
    ax_acc.grid(alpha=0.3)
    return _save(fig, path)


def time_to_accuracy(
    runs: list[dict], rows: list[dict], path: Path, target: float, title: str = ""
) -> Path:
    """Test accuracy against simulated pipeline time (steps x the setting's step time), seed 0,
    one line per (rule, h); the target as a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        key = (row["model"], row["dataset"], row["rule"], row["horizon"], 0, "")
        run = next((r for r in runs if _run_key(r) == key), None)
        if run is None:
            continue
        seconds = [step * row["step_ms"] / 1000 for step, _ in run["evals"]]
        ax.plot(
            seconds,
            [100 * a for _, a in run["evals"]],
            "-" if row["rule"] == "receding" else "--",
            label=f"{row['rule']} h={row['horizon']}",
        )
    ax.axhline(100 * target, color="grey", ls=":", label=f"target {100 * target:.0f}%")
    ax.set(
        xlabel="simulated pipeline time (s, P = T stages)",
        ylabel="test accuracy (%)",
        title=title,
        ylim=(100 * target - 10, 100),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _run_key(run: dict) -> tuple:
    return tuple(run[k] for k in ("model", "dataset", "rule", "horizon", "seed", "variant"))


def _save(fig, path: Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def data_study_curves(results: list[dict], targets: dict[str, float], path: Path) -> Path:
    """The data study: test top-1 against training steps (top; the same for any machine load)
    and training seconds (bottom; from each run's records), a column per network, a line per
    run (one process solid, two processes dashed, torch's back-propagation dotted), the
    network's target dashed grey."""
    models = list(targets)
    fig, axes = plt.subplots(2, len(models), figsize=(6.2 * len(models), 8), squeeze=False)
    styles = {"single": "-", "pipeline": "--", "torch": ":"}
    for column, model in enumerate(models):
        for row, (index, xlabel) in enumerate(((0, "training steps"), (3, "training seconds"))):
            ax = axes[row][column]
            for r in (r for r in results if r["model"] == model):
                x = [e[index] for e in r["evals"]]
                y = [100 * e[1] for e in r["evals"]]
                ax.plot(x, y, styles[r["where"]], marker=".", label=r["label"])
            ax.axhline(100 * targets[model], color="grey", ls="--", lw=0.8, label="target")
            ax.set(xlabel=xlabel, ylabel="test top-1 (%)", title=model)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)
