"""What ``mpc-dist bench`` writes: a line per case as it finishes, then under ``--out``
``bench.md`` and ``bench.csv`` (one row per case), ``bench.json`` (the options, the calibration
and every result), a Perfetto trace and a Gantt chart per case, and per m the horizon sweep and
throughput against memory."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from ..console import console
from .blocks import state_shape
from .cases import TIMM_VITS, BenchOptions
from .summary import Calibration, Result


def print_row(r: Result) -> None:
    def pct(values) -> str:
        return f"{100 * statistics.mean(values):5.1f}%" if values else "  n/a "

    peak = f"{max(r.peak_mib):6.1f} MiB" if r.peak_mib else "   n/a    "
    allocated = f"  allocated {max(r.allocated_mib):7.1f} MiB" if r.allocated_mib else ""
    console.print(
        f"m={r.case.microbatches:<3} {r.case.name:<38} {1000 * r.time_per_minibatch:8.1f} ms "
        f"{r.samples_per_s:7.0f}/s  bubble {pct(r.bubble)} sim {pct(r.simulated_bubble)} "
        f"compute-only {pct(r.compute_bubble)}  peak {peak}{allocated}",
        soft_wrap=True,
    )


def write_reports(results: list[Result], options: BenchOptions, calibration: Calibration) -> None:
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    _compare_with_torch(results, options.microbatches)
    rows = [_row(r) for r in results]
    with (out / "bench.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.md").write_text(_markdown(rows, options, calibration))
    recorded = {
        **asdict(options),
        "latency_ms": calibration.latency_ms,  # measured: what the simulator was fed
        "block_costs": asdict(calibration.block_costs),
    }
    report = {"args": recorded, "results": [{**asdict(r), "trace": None} for r in results]}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    _draw(results, rows, options)
    console.print(
        f"\nwrote {out}/: bench.md, bench.csv, traces/*.json (Perfetto), gantt/*.png, "
        "horizon_sweep_m*.png, throughput_vs_memory_m*.png"
    )


def _compare_with_torch(results: list[Result], microbatches: tuple[int, ...]) -> None:
    """Every result's speed-up over torch's 1F1B and over the fastest torch schedule at its m."""
    for m in microbatches:
        here = [r for r in results if r.case.microbatches == m and r.time_per_minibatch]
        torch_runs = [r for r in here if r.case.system == "torch"]
        one_f_one_b = next((r for r in torch_runs if r.case.policy == "Schedule1F1B"), None)
        best = min(torch_runs, key=lambda r: r.time_per_minibatch, default=None)
        for r in here:
            if one_f_one_b:
                r.vs_torch_1f1b = one_f_one_b.time_per_minibatch / r.time_per_minibatch
            if best:
                r.vs_best_torch = best.time_per_minibatch / r.time_per_minibatch


def _draw(results: list[Result], rows: list[dict], options: BenchOptions) -> None:
    """Per case a Perfetto trace and a Gantt chart; per m the sweep and throughput plots."""
    from .plots import gantt, horizon_sweep, throughput_vs_memory

    out, P = Path(options.out), options.stages
    for r in results:
        if r.trace:
            name = r.case.name.split(" (failed")[0]
            slug = f"m{r.case.microbatches}_" + (
                name.replace(" ", "_").replace("=", "").replace("+", "plus")
            )
            _chrome_trace(r, out / "traces" / f"{slug}.json")
            title = f"{r.case.name}, m = {r.case.microbatches}"
            gantt(r.trace, P, out / "gantt" / f"{slug}.png", title)
    for m in options.microbatches:
        mine = [row for row in rows if row["microbatches"] == m]
        title = f"P = {P}, m = {m}"
        horizon_sweep(mine, out / f"horizon_sweep_m{m}.png", title)
        throughput_vs_memory(mine, out / f"throughput_vs_memory_m{m}.png", title)


def _row(r: Result) -> dict:
    """The case's row of bench.csv and bench.md."""

    def pct(values):
        return round(100 * statistics.mean(values), 2) if values else ""

    case = r.case
    return {
        "configuration": case.name,
        "system": case.system,
        "microbatches": case.microbatches,
        "rule": case.rule,
        "horizon": case.horizon or "",
        "mode": case.mode,
        "deferred_weights": case.defer,
        "ms_per_minibatch": round(1000 * r.time_per_minibatch, 2),
        "samples_per_s": round(r.samples_per_s, 1),
        "speedup_vs_best_torch": round(r.vs_best_torch, 3),
        "speedup_vs_torch_1f1b": round(r.vs_torch_1f1b, 3),
        "peak_activation_mib_max": round(max(r.peak_mib), 2) if r.peak_mib else "",
        "peak_allocated_mib_max": round(max(r.allocated_mib), 1) if r.allocated_mib else "",
        "bubble_pct": pct(r.bubble),
        "simulated_bubble_pct": pct(r.simulated_bubble),
        "compute_bubble_pct": pct(r.compute_bubble),
        "overhead_ms_per_F_B_W": " ".join(f"{o:.2f}" for o in r.overhead_ms),
        "simulated_ms_per_minibatch": round(1000 * r.simulated_time, 2) if r.simulated_time else "",
        "fill_ms": round(1000 * r.fill, 1) if r.fill is not None else "",
        "bubble_per_stage_pct": " ".join(f"{100 * b:.1f}" for b in r.bubble),
        "peak_activation_mib_per_stage": " ".join(f"{m:.2f}" for m in r.peak_mib),
        "peak_allocated_mib_per_stage": " ".join(f"{m:.1f}" for m in r.allocated_mib),
    }


MARKDOWN_COLUMNS = (
    "configuration",
    "ms_per_minibatch",
    "samples_per_s",
    "speedup_vs_best_torch",
    "speedup_vs_torch_1f1b",
    "peak_activation_mib_max",
    "bubble_pct",
    "simulated_bubble_pct",
    "compute_bubble_pct",
    "fill_ms",
)


def _markdown(rows: list[dict], options: BenchOptions, calibration: Calibration) -> str:
    o = options
    lines = [
        f"P = {o.stages} stages of {o.blocks_per_stage} block(s), microbatches of "
        f"{o.microbatch_size} x {' x '.join(map(str, state_shape(o)))}, "
        f"{_blocks_line(options, calibration)}, {o.steps} measured steps after {o.warmup} "
        "warm-up.",
    ]
    cols = MARKDOWN_COLUMNS
    if o.device == "cuda":  # beside the saved activations: all the GPU memory a case took
        at = cols.index("peak_activation_mib_max") + 1
        cols = (*cols[:at], "peak_allocated_mib_max", *cols[at:])
    for m in o.microbatches:
        lines += ["", f"### m = {m}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        mine = [row for row in rows if row["microbatches"] == m]
        lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in mine]
    return "\n".join(lines) + "\n"


def _blocks_line(options: BenchOptions, calibration: Calibration) -> str:
    """What the blocks are and where they ran, for bench.md."""
    costs, o = calibration.block_costs, options
    if not o.real:
        return f"emulated F = B = W = {o.cost_ms} ms per block"
    if o.block in TIMM_VITS:
        kind = f"timm {TIMM_VITS[o.block]} blocks ({o.tokens} tokens)"
    else:
        kind = f"real residual MLP blocks ({o.width} -> {o.hidden})"
    where = "one GPU per stage, NCCL" if o.device == "cuda" else "one thread per process, gloo"
    precision = {"bf16": "bf16 autocast", "fp32": "fp32"}[o.precision]
    if o.device == "cuda" and o.precision == "fp32":
        precision += " (TF32 matmuls)"
    return (
        f"{kind}, {precision}, {where}; measured F {1000 * costs.forward:.2f}, "
        f"B {1000 * costs.input_grad:.2f}, W {1000 * costs.weight_grad:.2f} ms per block"
    )


def _chrome_trace(r: Result, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    start = min(s for _, _, s, _ in r.trace)
    events = [
        {
            "name": kind,
            "ph": "X",
            "pid": 0,
            "tid": stage,
            "ts": 1e6 * (s - start),
            "dur": 1e6 * (e - s),
            "cat": kind,
        }
        for stage, kind, s, e in r.trace
    ]
    for k in sorted({t[0] for t in r.trace}):
        name = {"name": f"stage {k}"}
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": k, "args": name})
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
