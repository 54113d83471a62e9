"""Metrics: JSONL (always), TensorBoard (when installed), the progress lines and a plot. The
console, the progress bar and the summary table are in ``mpc_dist.console``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import Progress

from ..core.compile import CompileStats


class StorageError(RuntimeError):
    """A run file could not be written (a full disk): the message names it."""


def storage_error(path: Path, error: OSError, run_dir: Path) -> StorageError:
    """One line: what could not be written, why, and what is safe."""
    from .checkpoint import Checkpointer

    latest = Checkpointer(run_dir / "checkpoints").latest()
    kept = f"the last complete checkpoint {latest} is intact" if latest else "no checkpoint yet"
    return StorageError(
        f"could not write {path} ({error.strerror or error}); {kept}; free space there (or "
        f"move run.out_dir) and resume with --resume"
    )


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir, self.path = run_dir, run_dir / "metrics.jsonl"
        try:
            if resume_step is not None and self.path.exists():
                # Drop what an interrupted run logged after its last checkpoint: it is redone.
                kept = [line for line in self.read(self.path) if line["step"] <= resume_step]
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            elif resume_step is None:
                self.path.write_text("")
        except OSError as error:
            raise storage_error(self.path, error, run_dir) from error
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._writer = None

    def log(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as error:
            raise storage_error(self.path, error, self.run_dir) from error
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as error:
            raise storage_error(self.path, error, self.run_dir) from error
        if self._writer is not None:
            self._writer.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(metrics_path: Path, out_path: Path, title: str = "") -> Path:
    """Train loss against step and test accuracy against step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = MetricsLogger.read(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set(xlabel="optimizer step", ylabel="train loss", yscale="log", title="train loss")
    ax_acc.plot([r["step"] for r in evals], [100 * r["accuracy"] for r in evals], "o-")
    ax_acc.set(xlabel="optimizer step", ylabel="test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


class StepLog:
    """The progress bar and the metrics lines (means over the steps since the last line).

    Where stderr is no terminal (a log file, Ray's or Slurm's log forwarding) the bar cannot
    redraw, so every metrics line is also printed as a plain progress line.
    """

    def __init__(
        self, bar: Progress, logger: MetricsLogger | None, every: int, completed: int, last: int
    ) -> None:
        self.bar, self.logger, self.every, self.last = bar, logger, every, last
        self.task = bar.add_task("train", total=last, completed=completed, status="")
        self.started, self.seen = time.perf_counter(), 0
        self.window = [0.0, 0, 0, 0.0, 0]  # loss x samples, correct, samples, data wait, steps

    def step(
        self, step: int, batch_size: int, result: tuple | None, lr: float, wait_s: float = 0.0
    ) -> None:
        """One optimizer step: its (loss, correct, samples) where the final loss is seen, and
        the seconds this process waited for the step's data."""
        self.seen += batch_size
        if result is None:  # only the rank holding the last stage sees the loss
            return
        loss, correct, count = result
        window = self.window
        self.window = [
            window[0] + loss * count,
            window[1] + correct,
            window[2] + count,
            window[3] + wait_s,
            window[4] + 1,
        ]
        rate = self.seen / (time.perf_counter() - self.started)
        status = f"loss {loss:.4f}  acc {correct / count:.3f}  {rate:,.0f} samples/s"
        if self.window[3]:  # this process reads the data: is the loader keeping up?
            status += f"  data wait {1000 * self.window[3] / self.window[4]:.0f} ms"
        self.bar.update(self.task, advance=1, status=status)
        if self.logger and (step % self.every == 0 or step == self.last):
            total_loss, total_correct, samples, wait, steps = self.window
            self.logger.log(
                "train",
                step,
                loss=total_loss / samples,
                accuracy=total_correct / samples,
                lr=lr,
                samples_per_s=rate,
                data_wait_s=wait / steps,
            )
            self.window = [0.0, 0, 0, 0.0, 0]
            if not self.bar.disable and not self.bar.console.is_terminal:
                self.bar.console.print(f"step {step}/{self.last}  {status}", highlight=False)


class CompileLog:
    """What this process compiled while training (``train.compile: blocks``), by training call:
    the first (the first step; the first window in async mode) compiles the blocks, the second
    may add what only a second step meets, and nothing should be compiled after that."""

    def __init__(self) -> None:
        self.calls = 0
        self.first = self.second = self.later = CompileStats(0, 0, 0.0)

    @contextmanager
    def training_call(self) -> Iterator[None]:
        before = CompileStats.now()
        yield
        spent = CompileStats.now().since(before)
        if self.calls == 0:
            self.first = spent
        elif self.calls == 1:
            self.second = spent
        else:
            self.later = self.later + spent
        self.calls += 1

    def record(self) -> dict[str, float]:
        """For metrics.jsonl: the first step's compile seconds and graphs, graph breaks, and the
        graphs compiled after the second step (recompilations; 0 expected)."""
        breaks = self.first.graph_breaks + self.second.graph_breaks + self.later.graph_breaks
        return {
            "compile_first_step_s": round(self.first.seconds, 3),
            "graphs_first_step": self.first.graphs,
            "graphs_second_step": self.second.graphs,
            "graph_breaks": breaks,
            "recompiles_after_second_step": self.later.graphs,
        }
