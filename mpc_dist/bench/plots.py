"""Pictures of pipelines: Gantt charts of timelines, the horizon sweep, throughput against
memory."""

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
            bars = [
                (1000 * (s - start), 1000 * (e - s))
                for k, c, s, e in trace
                if k == stage and c == kind
            ]
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
    ax.set(
        xlabel="peak activation memory of the busiest rank (MiB)",
        ylabel="samples / s",
        title=title or "throughput against memory",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
