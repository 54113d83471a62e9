"""``train(config)``: the one entry point every launcher calls, and the training loop.

The loop (data order, learning rate, logging, checkpoints, resume, evaluation) is the same for
a single process and for every rank of a pipeline; the runner hides which one it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config
from ..console import console, print_summary, progress_bar
from ..data import Loader, Source, open_source
from ..models import BlockModel, build_model
from .attempts import begin_attempt, prepare_run_dir
from .bootstrap import Job, check_shared_directory, check_world_size, join_job
from .callbacks import Callback
from .checkpoint import Checkpointer
from .metrics import CompileLog, MetricsLogger, StepLog, plot_run
from .precision import configure_tf32
from .runner import PipelineRunner, Runner, SingleRunner
from .selection import Reselect, report, run_plan
from .step import TrainingError, learning_rate
from .validate import validate_config


@dataclass
class Progress:
    """Where training is; saved with every checkpoint."""

    epoch: int = 0
    batch: int = 0  # next batch within the epoch
    step: int = 0  # optimizer steps taken


def train(
    config: Config,
    resume: bool = False,
    callbacks: Iterable[Callback] = (),
    attempt: Mapping[str, Any] | None = None,
) -> dict:
    """Train (or resume) the run ``config`` describes; returns the final metrics.

    Called in every process, by every launcher. A pipeline config (pipeline.stages x
    pipeline.replicas > 1) needs a launcher that set RANK and WORLD_SIZE. ``callbacks`` hook
    into the loop (``mpc_dist.train.Callback``). A job its launcher restarted resumes from the
    latest complete checkpoint by itself; ``attempt``: what the launcher adds to the record of
    this start in ``attempts.jsonl``.
    """
    validate_config(config)
    model, train_source, test_source = open_run(config)
    seed = config.train.seed
    callbacks = list(callbacks)
    check_world_size(config)
    job = join_job(config) if config.world_size > 1 else None
    runner, resume = _start(config, model, train_source, resume, job, callbacks, attempt)
    configure_tf32(config.train.tf32, runner.device)
    train_data, test_data = (
        Loader(
            source,
            config.data,
            config.augment,
            split,
            seed,
            runner.shard,
            config.data.num_microbatches,
            runner.device,
        )
        for source, split in ((train_source, "train"), (test_source, "test"))
    )
    if config.horizon.reselect_every:
        steps = train_data.batches_per_epoch
        callbacks.append(Reselect(config, runner, train_source, steps))
    try:
        result = fit(config, runner, train_data, test_data, resume, callbacks)
    except BaseException as error:
        runner.fail(error)
        raise
    runner.close()
    return result


def open_run(config: Config) -> tuple[BlockModel, Source, Source]:
    """A config's model, built on the meta device (each process allocates only what it holds:
    all of it, or its stage), and its training and test splits, listed (in-memory sets load
    whole; no image file is opened)."""
    seed = config.train.seed
    train_source = open_source(config.data, "train", seed)
    test_source = open_source(config.data, "test", seed)
    torch.manual_seed(seed)
    shape, classes = train_source.input_shape, train_source.num_classes
    return build_model(config.model, shape, classes, device="meta"), train_source, test_source


def _start(
    config: Config,
    model: BlockModel,
    train_source: Source,
    resume: bool,
    job: Job | None,
    callbacks: list[Callback],
    attempt: Mapping[str, Any] | None = None,
) -> tuple[Runner, bool]:
    """The plan, the run directory (written by one rank) and the runner of this process; and
    whether it resumes (rank 0 decides: see ``attempts.begin_attempt``)."""
    try:
        begin = lambda: begin_attempt(config, resume, attempt)  # noqa: E731
        record = job.from_rank_zero(begin) if job is not None else begin()
        resume = record["resume_from"] is not None
        plan, selections = run_plan(config, model, train_source, resume, job)
        prepare_run_dir(config, resume, write=job is None or job.is_rank_zero)
        if job is not None:  # every rank writes its shards of a checkpoint there
            check_shared_directory(config.run_dir)
        for selection in selections:
            report(selection, config.run_dir)
        if job is None:
            return SingleRunner(config, model, plan, callbacks), resume
        return PipelineRunner(config, model, plan, job, callbacks), resume
    except BaseException as error:
        if job is not None:
            job.watchdog.fail(error)
        raise


def fit(
    config: Config,
    runner: Runner,
    train_data: Loader,
    test_data: Loader,
    resume: bool,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """The loop: chunks of minibatches, evaluation at epoch ends, checkpoints, the summary."""
    run = TrainingRun(config, runner, train_data, test_data, resume, callbacks)
    state, data = run.state, config.data
    with progress_bar(config.run.progress and runner.is_logger) as bar:
        log = StepLog(bar, run.logger, config.train.log_every, state.step, run.stop_at)
        while state.epoch < config.train.epochs and state.step < run.stop_at:
            batches = train_data.epoch(state.epoch, state.batch)
            while state.batch < run.steps_per_epoch and state.step < run.stop_at:
                size = run.chunk_size()
                chunk, waits = [], []
                for _ in range(size):
                    chunk.append(next(batches))
                    waits.append(train_data.last_wait_s)
                rates = [
                    learning_rate(config.optim, state.step + j, run.total_steps)
                    for j in range(size)
                ]
                results = run.train_chunk(chunk, rates)
                for j in range(size):
                    state.step, state.batch = state.step + 1, state.batch + 1
                    result = results[j] if results else None
                    log.step(state.step, data.batch_size, result, rates[j], waits[j])
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
        train_data: Loader,
        test_data: Loader,
        resume: bool,
        callbacks: Sequence[Callback],
    ) -> None:
        self.config, self.runner = config, runner
        self.train_data, self.test_data = train_data, test_data
        self.callbacks = callbacks
        self.checkpointer = Checkpointer(
            config.run_dir / "checkpoints", config.run.keep_checkpoints
        )
        self.state = Progress()
        if resume:
            fallback = config.run.resume_fallback
            _, state = self.checkpointer.load_latest(runner.model, runner.optimizer, fallback)
            self.state = Progress(**state)
        self.steps_per_epoch = train_data.batches_per_epoch
        self.total_steps = config.train.epochs * self.steps_per_epoch
        self.stop_at = min(self.total_steps, config.train.max_steps or self.total_steps)
        self.logger = None
        if runner.is_logger:
            self.logger = MetricsLogger(
                config.run_dir, config.run.tensorboard, self.state.step if resume else None
            )
        self.final: dict[str, float] = {}
        self.data_stats: dict = {"wait_s": 0.0, "skipped": 0, "skipped_files": []}
        self.stages: dict[str, list[float]] = {}
        self.evaluated_at = -1
        self.compiles = CompileLog() if config.train.compile == "blocks" else None

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
        if self.compiles is None:
            return self._train_chunk(chunk, learning_rates)
        with self.compiles.training_call():
            results = self._train_chunk(chunk, learning_rates)
        if self.logger is not None and self.compiles.calls <= 2:  # what the first two compiled
            self.logger.log("compile", self.state.step + len(chunk), **self.compiles.record())
        return results

    def _train_chunk(self, chunk: list, learning_rates: list[float]) -> list:
        self.runner.note("training", self.state.step)
        try:
            return self.runner.run(chunk, learning_rates)
        except TrainingError as error:
            first, last = self.state.step, self.state.step + len(chunk) - 1
            raise TrainingError(
                f"{error} in steps {first}-{last} (epoch {self.state.epoch}); weights not "
                f"updated, last good checkpoint kept: {self.checkpointer.latest()}; lower "
                f"optim.lr, set optim.grad_clip, or skip such steps (optim.on_nonfinite=skip)"
            ) from None

    def save(self) -> None:
        step, runner = self.state.step, self.runner
        if self.checkpointer.latest() == self.checkpointer.directory / f"step_{step:08d}":
            return
        runner.note(f"writing the checkpoint of step {step}", step)
        path = self.checkpointer.save(step, runner.model, runner.optimizer, vars(self.state))
        for callback in self.callbacks:
            callback.after_checkpoint(step, path)

    def evaluate(self, announce: bool = False) -> None:
        self.evaluated_at = self.state.step
        self.runner.note(f"evaluating at step {self.state.step}", self.state.step)
        self.final = self.runner.evaluate(self.test_data)
        self.data_stats = self.runner.data_report(self.train_data.stats())  # collective
        self.stages.update(self.runner.stage_report())  # collective in a pipeline
        for callback in self.callbacks:
            callback.after_evaluate(self.state.step, self.final)
        if self.logger is not None:
            self.logger.log(
                "eval",
                self.state.step,
                epoch=self.state.epoch,
                **self.final,
                **self.stages,
                data_wait_s=self.data_stats["wait_s"],
                skipped_images=self.data_stats["skipped"],
            )
        if announce and self.runner.is_logger:
            console.print(
                f"epoch {self.state.epoch}: test accuracy {100 * self.final['accuracy']:.2f}% "
                f"(top-5 {100 * self.final['top5']:.2f}%)  test loss {self.final['loss']:.4f}"
            )

    def summary(self, log: StepLog) -> dict:
        """Print the summary table (and write the plot) on the logging rank; return the metrics."""
        if self.logger is None:
            return self.final
        if self.compiles is not None:
            self.logger.log("compile", self.state.step, **self.compiles.record())
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
            "test top-5 accuracy": self.final["top5"],
            "data wait (s)": self.data_stats["wait_s"],
        }
        skipped = self.data_stats["skipped"]
        if skipped:
            files = ", ".join(self.data_stats["skipped_files"][:3])
            more = " ..." if skipped > 3 else ""
            summary["skipped images (data.on_error=skip)"] = f"{skipped}: {files}{more}"
        if self.stages:
            pairs = zip(self.stages["stage_busy_s"], self.stages["stage_idle_s"], strict=True)
            summary["stage busy / idle (s)"] = "  ".join(f"{b:.1f}/{i:.1f}" for b, i in pairs)
            summary["stage peak activations (MiB)"] = "  ".join(
                f"{m:.2f}" for m in self.stages["stage_peak_activation_mib"]
            )
        if self.compiles is not None:
            compiled = self.compiles.record()
            summary["compile, first step (s)"] = compiled["compile_first_step_s"]
            summary["graphs compiled (first / second step / later)"] = (
                f"{compiled['graphs_first_step']} / {compiled['graphs_second_step']} / "
                f"{compiled['recompiles_after_second_step']}  ({compiled['graph_breaks']} breaks)"
            )
        if config.run.plot:
            plot = plot_run(self.logger.path, config.run_dir / "plot.png", summary["plan"])
            summary["plot"] = str(plot)
        print_summary(f"mpc_dist: {config.model.name} on {config.data.dataset}", summary)
        return summary
