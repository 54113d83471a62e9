"""Pictures of pipelines: Gantt charts of timelines and the horizon sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868", "S": "#8172B2"}
LABELS = {"F": "forward", "B": "input gradient", "W": "weight gradient", "S": "optimizer step"}


def gantt(
    trace: list[tuple[int, str, float, float]], num_stages: int, path: Path, title: str
) -> Path:
    """Stages as rows, F/B/W as coloured bars; white is idle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = min(s for _, _, s, _ in trace)
    fig, ax = plt.subplots(figsize=(12, 0.45 * num_stages + 1.2))
    for kind, colour in COLOURS.items():
        for stage in range(num_stages):
            bars = [(1000 * (s - start), 1000 * (e - s)) for k, c, s, e in trace
                    if k == stage and c == kind]  # fmt: skip
            if bars:
                ax.broken_barh(bars, (stage - 0.4, 0.8), facecolors=colour, linewidth=0)
    ax.set_yticks(range(num_stages), [f"stage {k}" for k in range(num_stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k in ("F", "B", "W")]
    ax.legend(handles, [LABELS[k] for k in ("F", "B", "W")], loc="upper right", fontsize=8)
    return _save(fig, path, 110)


def horizon_sweep(rows: list[dict], path: Path, title: str = "") -> Path:
    """Samples/s and bubble against h, one line per rule and mode, BP baselines as lines."""
    fig, (ax_rate, ax_bubble) = plt.subplots(1, 2, figsize=(11, 4))
    fig.suptitle(title)
    series: dict[str, list[tuple[int, float, float]]] = {}
    for row in rows:
        if row["system"] == "ours" and row["horizon"] and row["samples_per_s"]:
            key = f"{row['rule']} {row['mode']}" + (" +W" if row.get("deferred_weights") else "")
            series.setdefault(key, []).append(
                (int(row["horizon"]), row["samples_per_s"], row["bubble_pct"])
            )
    for key, points in sorted(series.items()):
        points.sort()
        h = [p[0] for p in points]
        ax_rate.plot(h, [p[1] for p in points], "o-", label=key)
        ax_bubble.plot(h, [p[2] for p in points], "o-", label=key)
    for row in rows:
        if row["configuration"] in ("torch Schedule1F1B", "ours BP-1F1B") and row["samples_per_s"]:
            style = "--" if row["system"] == "torch" else ":"
            ax_rate.axhline(
                row["samples_per_s"], ls=style, color="grey", label=row["configuration"]
            )
            ax_bubble.axhline(row["bubble_pct"], ls=style, color="grey", label=row["configuration"])
    ax_rate.set(xlabel="horizon h", ylabel="samples / s", title="throughput")
    ax_bubble.set(xlabel="horizon h", ylabel="bubble (%)", title="bubble (idle share)")
    for ax in (ax_rate, ax_bubble):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, 110)


def throughput_vs_memory(rows: list[dict], path: Path, title: str = "") -> Path:
    """One point per configuration: samples/s against the peak activation memory of its most
    loaded rank. Up and to the left wins at any memory budget."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {"ours": ("o", "#DD8452"), "torch": ("s", "#4C72B0"), "deepspeed": ("^", "#55A868")}
    for row in rows:
        if not row["samples_per_s"] or row["peak_activation_mib_max"] == "":
            continue
        marker, colour = styles[row["system"]]
        x, y = row["peak_activation_mib_max"], row["samples_per_s"]
        ax.scatter(x, y, marker=marker, color=colour)
        label = row["configuration"].removeprefix("ours ").removeprefix("torch Schedule")
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for system, (marker, colour) in styles.items():
        ax.scatter([], [], marker=marker, color=colour, label=system)
    ax.set(xlabel="peak activation memory of the busiest rank (MiB)", ylabel="samples / s",
           title=title or "throughput against memory")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


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
        ax_mem.bar([p + (i - 0.5) * width for p in x], [r["peak_mib"] for r in mine], width,
                   color=colour, alpha=0.25, label=f"{rule} memory")  # fmt: skip
        ax_acc.errorbar(x, [100 * r["accuracy_mean"] for r in mine],
                        [100 * r["accuracy_std"] for r in mine], fmt="o-", color=colour,
                        capsize=3, label=f"{rule} accuracy")  # fmt: skip
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
        ax.plot(seconds, [100 * a for _, a in run["evals"]],
                "-" if row["rule"] == "receding" else "--",
                label=f"{row['rule']} h={row['horizon']}")  # fmt: skip
    ax.axhline(100 * target, color="grey", ls=":", label=f"target {100 * target:.0f}%")
    ax.set(xlabel="simulated pipeline time (s, P = T stages)", ylabel="test accuracy (%)",
           title=title, ylim=(100 * target - 10, 100))  # fmt: skip
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
