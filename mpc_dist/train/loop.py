"""``train(config)``: the one entry point every launcher calls, and the training loop.

The loop (data order, learning rate, logging, checkpoints, resume, evaluation) is the same for
a single process and for every rank of a pipeline; the runner hides which one it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..models import build_model
from .callbacks import Callback
from .checkpoint import Checkpointer
from .data import Dataset, load_dataset, minibatches, num_batches
from .horizon import Reselect, plan_chooser, report
from .metrics import MetricsLogger, StepLog, console, plot_run, print_summary, progress_bar
from .runner import Runner, make_runner
from .step import TrainingError, learning_rate
from .validate import validate


@dataclass
class Progress:
    """Where training is; saved with every checkpoint."""

    epoch: int = 0
    batch: int = 0  # next batch within the epoch
    step: int = 0  # optimizer steps taken


def train(config: Config, resume: bool = False, callbacks: Iterable[Callback] = ()) -> dict:
    """Train (or resume) the run ``config`` describes; returns the final metrics.

    Called in every process, by every launcher. A pipeline config (pipeline.stages x
    pipeline.replicas > 1) needs a launcher that set RANK and WORLD_SIZE. ``callbacks`` hook
    into the loop (``mpc_dist.train.Callback``).
    """
    validate(config)
    data, seed = config.data, config.train.seed
    train_set = load_dataset(data.dataset, "train", data.root, data.synthetic_size, seed,
                             data.standardise)  # fmt: skip
    test_set = load_dataset(data.dataset, "test", data.root, data.synthetic_size, seed,
                            data.standardise)  # fmt: skip
    torch.manual_seed(seed)
    # on the meta device: each process allocates only what it holds (all of it, or its stage)
    model = build_model(config.model, train_set.input_shape, train_set.num_classes, device="meta")
    choose, selected = plan_chooser(config, model, train_set, resume)
    callbacks = list(callbacks)
    prepare = lambda write: prepare_run_dir(config, resume, write)  # noqa: E731
    runner = make_runner(config, model, choose, prepare, callbacks)
    for selection in selected:
        report(selection, config.run_dir)
    if config.horizon.reselect_every:
        steps_per_epoch = num_batches(train_set, config.data.batch_size)
        callbacks.append(Reselect(config, runner, train_set, steps_per_epoch))
    try:
        result = fit(config, runner, train_set, test_set, resume, callbacks)
    except BaseException as error:
        runner.fail(error)
        raise
    runner.close()
    return result


def prepare_run_dir(config: Config, resume: bool, write: bool = True) -> Path:
    run_dir = config.run_dir
    checkpoints = run_dir / "checkpoints"
    if not resume and any(checkpoints.glob("step_*")):
        raise ConfigError(
            f"run.name={config.run.name}: {run_dir} already holds checkpoints; pass --resume to "
            f"continue it or choose another run.name"
        )
    if resume and not any(checkpoints.glob("step_*")):
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml())
    return run_dir


def fit(
    config: Config,
    runner: Runner,
    train_set: Dataset,
    test_set: Dataset,
    resume: bool,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """The loop: chunks of minibatches, evaluation at epoch ends, checkpoints, the summary."""
    run = TrainingRun(config, runner, train_set, test_set, resume, callbacks)
    state, data = run.state, config.data
    with progress_bar(config.run.progress and runner.is_logger) as bar:
        log = StepLog(bar, run.logger, config.train.log_every, state.step, run.stop_at)
        while state.epoch < config.train.epochs and state.step < run.stop_at:
            batches = minibatches(
                train_set, data.batch_size, config.train.seed, state.epoch,
                start_batch=state.batch, shard=runner.shard,
            )  # fmt: skip
            while state.batch < run.steps_per_epoch and state.step < run.stop_at:
                size = run.chunk_size()
                chunk = [next(batches) for _ in range(size)]
                rates = [learning_rate(config.optim, state.step + j, run.total_steps)
                         for j in range(size)]  # fmt: skip
                results = run.train_chunk(chunk, rates)
                for j in range(size):
                    state.step, state.batch = state.step + 1, state.batch + 1
                    log.step(state.step, data.batch_size, results[j] if results else None, rates[j])
                run.after_chunk()
            if state.batch == run.steps_per_epoch:
                state.epoch, state.batch = state.epoch + 1, 0
                run.evaluate(announce=True)
            run.save()
    if run.evaluated_at != state.step:  # stopped mid-epoch (max_steps): evaluate where we are
        run.evaluate()
    return run.summary(log)


class TrainingRun:
    """The loop's state and its side effects: progress, checkpoints, metrics, evaluation."""

    def __init__(
        self,
        config: Config,
        runner: Runner,
        train_set: Dataset,
        test_set: Dataset,
        resume: bool,
        callbacks: Sequence[Callback],
    ) -> None:
        self.config, self.runner, self.test_set = config, runner, test_set
        self.callbacks = callbacks
        self.checkpointer = Checkpointer(
            config.run_dir / "checkpoints", config.run.keep_checkpoints
        )
        self.state = Progress()
        if resume:
            latest = self.checkpointer.latest()
            self.state = Progress(**self.checkpointer.load(latest, runner.model, runner.optimizer))
        self.steps_per_epoch = num_batches(train_set, config.data.batch_size)
        self.total_steps = config.train.epochs * self.steps_per_epoch
        self.stop_at = min(self.total_steps, config.train.max_steps or self.total_steps)
        self.logger = None
        if runner.is_logger:
            self.logger = MetricsLogger(
                config.run_dir, config.run.tensorboard, self.state.step if resume else None
            )
        self.final: dict[str, float] = {}
        self.stages: dict[str, list[float]] = {}
        self.evaluated_at = -1

    def chunk_size(self) -> int:
        """A chunk ends at the epoch's end, at stop_at, and at the next checkpoint or evaluation."""
        state = self.state
        size = min(
            self.runner.chunk_size, self.steps_per_epoch - state.batch, self.stop_at - state.step
        )
        for every in (self.config.run.checkpoint_every, self.config.train.eval_every):
            if every:
                size = min(size, every - state.step % every)
        return size

    def after_chunk(self) -> None:
        """Evaluate every train.eval_every steps (epoch ends evaluate anyway), checkpoint every
        run.checkpoint_every steps."""
        step, every = self.state.step, self.config.train.eval_every
        if every and step % every == 0 and self.state.batch < self.steps_per_epoch:
            self.evaluate()
        if self.config.run.checkpoint_every and step % self.config.run.checkpoint_every == 0:
            self.save()

    def train_chunk(self, chunk: list, learning_rates: list[float]) -> list:
        try:
            return self.runner.run(chunk, learning_rates)
        except TrainingError as error:
            first, last = self.state.step, self.state.step + len(chunk) - 1
            raise TrainingError(
                f"{error} in steps {first}-{last} (epoch {self.state.epoch}); weights not "
                f"updated, last good checkpoint kept: {self.checkpointer.latest()}; lower "
                f"optim.lr or set optim.grad_clip"
            ) from None

    def save(self) -> None:
        step, runner = self.state.step, self.runner
        if self.checkpointer.latest() == self.checkpointer.directory / f"step_{step:08d}":
            return
        path = self.checkpointer.save(step, runner.model, runner.optimizer, vars(self.state))
        for callback in self.callbacks:
            callback.after_checkpoint(step, path)

    def evaluate(self, announce: bool = False) -> None:
        self.evaluated_at = self.state.step
        self.final = self.runner.evaluate(self.test_set)
        self.stages.update(self.runner.stage_report())  # collective in a pipeline
        for callback in self.callbacks:
            callback.after_evaluate(self.state.step, self.final)
        if self.logger is not None:
            self.logger.log(
                "eval", self.state.step, epoch=self.state.epoch, **self.final, **self.stages
            )
        if announce and self.runner.is_logger:
            console.print(
                f"epoch {self.state.epoch}: test accuracy {100 * self.final['accuracy']:.2f}%  "
                f"test loss {self.final['loss']:.4f}"
            )

    def summary(self, log: StepLog) -> dict:
        """Print the summary table (and write the plot) on the logging rank; return the metrics."""
        if self.logger is None:
            return self.final
        self.logger.close()
        elapsed = time.perf_counter() - log.started
        plan, config = self.runner.plan, self.config
        summary = {
            "run": str(config.run_dir),
            "plan": f"{plan.rule} h={plan.horizon} of T={plan.num_blocks}",
            "processes": self.runner.description,
            "steps": self.state.step,
            "train time (s)": elapsed,
            "samples/s": log.seen / elapsed if elapsed else 0.0,
            "test loss": self.final["loss"],
            "test accuracy": self.final["accuracy"],
        }
        if self.stages:
            pairs = zip(self.stages["stage_busy_s"], self.stages["stage_idle_s"], strict=True)
            summary["stage busy / idle (s)"] = "  ".join(f"{b:.1f}/{i:.1f}" for b, i in pairs)
            summary["stage peak activations (MiB)"] = "  ".join(
                f"{m:.2f}" for m in self.stages["stage_peak_activation_mib"]
            )
        if config.run.plot:
            plot = plot_run(self.logger.path, config.run_dir / "plot.png", summary["plan"])
            summary["plot"] = str(plot)
        print_summary(f"mpc_dist: {config.model.name} on {config.data.dataset}", summary)
        return summary
