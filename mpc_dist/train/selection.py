"""The horizon package on a run's own model, data and device: ``horizon.horizon: auto`` (the
choice before training, and re-selection), ``mpc-dist select-horizon`` and ``mpc-dist probe``
over a run's checkpoints."""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import Config
from ..console import console
from ..core import Plan
from ..core.costs import middle_block_costs
from ..data import Loader, Source
from ..devices import dtype_of, resolve_device
from ..horizon import Alignment, Selection, Setting, choose, measure_candidates
from ..horizon import probe as probe_alignment
from ..models import BlockModel, instantiate
from .bootstrap import Job
from .callbacks import Callback
from .precision import compute_options
from .stage import schedule_spec
from .step import build_optimizer

SELECTION_TIMEOUT_S = 4 * 3600  # the longest horizon selection a pipeline waits for


def measurement_batches(
    config: Config, source: Source, count: int, skip: int = 0, like=None, whole=False
) -> Iterator:
    """``count`` microbatches of the run's size (``whole``: a replica's minibatches, what one
    optimizer step takes) after the first ``skip``, in the run's order of epoch 0 (fewer where
    the dataset ends), augmented as the run's; inputs on the device and in the dtype of the
    tensor ``like``."""
    d, p = config.data, config.pipeline
    size = d.batch_size // ((1 if whole else d.num_microbatches) * p.replicas)
    data = dataclasses.replace(d, batch_size=size)
    loader = Loader(source, data, config.augment, "train", config.train.seed)
    stop = min(skip + count, loader.batches_per_epoch)
    for x, y in itertools.islice(loader.epoch(0, min(skip, stop)), max(0, stop - skip)):
        if like is not None:
            x, y = (
                x.to(like.device, like.dtype if x.is_floating_point() else x.dtype),
                y.to(like.device),
            )
        yield x, y


def starting_model(config: Config, model: BlockModel, device="cpu") -> BlockModel:
    """The run's starting weights, whole, on ``device`` (a copy of the meta-device ``model``)."""
    m = config.model
    return instantiate(
        copy.deepcopy(model),
        device,
        dtype_of(config.train.dtype),
        config.train.seed,
        m.weights,
        m.lora,
    )


def select_horizon(config: Config, whole: BlockModel, source: Source) -> tuple[Plan, Selection]:
    """Measure every (rule, h) on ``whole`` (allocated, on its device; left as it is) and choose
    for ``horizon.objective``."""
    h, p = config.horizon, config.pipeline
    whole = copy.deepcopy(whole)
    like = next(whole.parameters())
    compute = compute_options(config.train, like.device)  # blocks timed as the run computes
    batches = list(measurement_batches(config, source, h.probe_batches, like=like))
    steps = h.progress_steps  # a held-out set after the training stream, 8 minibatches
    held_out = list(measurement_batches(config, source, 8 * bool(steps), steps, like, True))
    setting = Setting(
        stages=p.stages,
        schedule=schedule_spec(config),
        static_mib_per_device=static_mib(config, whole) / p.stages,
    )
    candidates, alignments, law, memory_laws = measure_candidates(
        whole,
        batches,
        middle_block_costs(whole, batches[0][0], compute),
        setting,
        lambda net: build_optimizer(config.optim, net.parameters()),
        lambda: measurement_batches(config, source, steps, like=like, whole=True),
        held_out,
    )
    choice, reason = choose(
        candidates, h.objective, h.memory_budget_mib, h.min_alignment, h.penalty, h.min_progress
    )
    selection = Selection(h.objective, candidates, law, memory_laws, choice, reason, alignments)
    return Plan(choice.rule, choice.horizon, whole.num_blocks), selection


def static_mib(config: Config, model: BlockModel) -> float:
    """MiB of weights, their gradients and the optimizer's state for ``model``."""
    o = config.optim
    states = 2 if o.name.startswith("adam") else int(o.momentum > 0)
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    size = torch.empty((), dtype=dtype_of(config.train.dtype)).element_size()
    return size * (sum(q.numel() for q in model.parameters()) + (1 + states) * trainable) / 2**20


def report(selection: Selection, run_dir: Path | None = None) -> None:
    """Print the fits, the table and the choice; keep them with the run."""
    law = selection.law
    console.print(
        f"horizon selection ({selection.objective}): 1 - cos^2 = {law.c:.3g} (1 - h/T)^"
        f"{law.p:.2f} (R^2 {law.r2:.3f} over {law.points} points); memory per device "
        + ", ".join(
            f"{rule} {f.slope:.2f} h + {f.intercept:.1f} MiB"
            for rule, f in sorted(selection.memory_laws.items())
        )
    )
    console.print(selection.table(), highlight=False)
    console.print(f"chosen: {selection.choice.name}: {selection.reason}")
    if run_dir is not None:
        record = {
            "objective": selection.objective,
            "choice": dataclasses.asdict(selection.choice),
            "reason": selection.reason,
            "law": dataclasses.asdict(law),
            "memory_laws": {r: dataclasses.asdict(f) for r, f in selection.memory_laws.items()},
            "candidates": [dataclasses.asdict(c) for c in selection.candidates],
        }
        with (run_dir / "horizon_selection.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\n")


def choose_plan(config: Config, model: BlockModel, source: Source) -> tuple[Plan, Selection]:
    """The plan for ``horizon.horizon: auto``, measured on this process's device."""
    device = resolve_device(config.train.device)
    return select_horizon(config, starting_model(config, model, device), source)


def run_plan(
    config: Config, model: BlockModel, source: Source, resume: bool, job: Job | None = None
) -> tuple[Plan, list[Selection]]:
    """The run's plan: the configured one, or for ``horizon: auto`` the measured choice (rank 0
    of a ``job`` measures, heartbeating meanwhile; the others wait for its choice) or,
    resuming, the run's last choice. Returns the selections made, to be reported."""
    T = model.num_blocks
    if config.horizon.horizon != "auto":
        return Plan(config.horizon.rule, config.horizon.horizon, T), []
    if resume and (previous := chosen_before(config.run_dir, T)):
        return previous, []
    if job is None:
        plan, selection = choose_plan(config, model, source)
        return plan, [selection]
    selected: list[Selection] = []

    def measure() -> Plan:
        plan, selection = choose_plan(config, model, source)
        selected.append(selection)
        return plan

    return job.from_rank_zero(measure, timeout_s=SELECTION_TIMEOUT_S), selected


def chosen_before(run_dir: Path, num_blocks: int) -> Plan | None:
    """The last plan a run chose (at start or re-selection), for resuming it as it was."""
    path = run_dir / "horizon_selection.jsonl"
    if not path.exists() or not path.read_text().strip():
        return None
    choice = json.loads(path.read_text().strip().splitlines()[-1])["choice"]
    return Plan(choice["rule"], choice["horizon"], num_blocks)


class Reselect(Callback):
    """``horizon.reselect_every``: choose again at every N-th epoch end (single process)."""

    def __init__(self, config: Config, runner, source: Source, steps_per_epoch: int) -> None:
        self.config, self.runner, self.source = config, runner, source
        self.steps_per_epoch = steps_per_epoch

    def after_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        epoch, every = step // self.steps_per_epoch, self.config.horizon.reselect_every
        if step % self.steps_per_epoch or epoch % every or epoch >= self.config.train.epochs:
            return
        plan, selection = select_horizon(self.config, self.runner.model, self.source)
        report(selection, self.config.run_dir)
        self.runner.set_plan(plan)


# ----------------------------------------------------------------------------- the probe


def probe_checkpoints(
    config: Config,
    model: BlockModel,
    source: Source,
    checkpoints: list[Path],
    horizons: list[int],
    batches: int,
) -> list[dict]:
    """cos(theta_h) at every checkpoint (or at the starting weights when there is none)."""
    from .checkpoint import Checkpointer

    data = list(measurement_batches(config, source, batches))
    rows = []
    for path in checkpoints or [None]:
        whole = starting_model(config, model)
        step = 0
        if path is not None:
            optimizer = build_optimizer(config.optim, whole.parameters())
            step = Checkpointer(path.parent).load(path, whole, optimizer)["step"]
        for a in probe_alignment(whole, data, horizons):
            rows.append(_row(a, step))
    return rows


def _row(a: Alignment, step: int) -> dict:
    return {
        "step": step,
        "rule": a.rule,
        "horizon": a.horizon,
        "num_blocks": a.num_blocks,
        "cos": a.cos,
        "one_minus_cos": 1 - a.cos,
        "one_minus_cos2": a.misalignment,
        "block_cos": " ".join(f"{c:.4f}" for c in a.block_cos),
    }


def write_probe(rows: list[dict], out: Path) -> list[Path]:
    """probe.csv, probe.json and probe.png (the paper's Fig. 2: 1 - cos(theta_h) against T - h,
    log axes, a line per checkpoint and rule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with (out / "probe.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "probe.json").write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (step, rule), group in _groups(rows).items():
        points = [
            (r["num_blocks"] - r["horizon"], r["one_minus_cos"])
            for r in group
            if r["horizon"] < r["num_blocks"] and r["one_minus_cos"] > 0
        ]
        if points:
            ax.plot(
                *zip(*sorted(points), strict=True),
                "o-" if rule == "receding" else "s--",
                label=f"step {step}, {rule}",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="T - h",
        ylabel="1 - cos(theta_h)",
        title="alignment with back-propagation",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=120)
    plt.close(fig)
    return [out / "probe.csv", out / "probe.json", out / "probe.png"]


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["step"], row["rule"]), []).append(row)
    return groups
