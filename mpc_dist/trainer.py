"""The training loop, shared by single-process and pipeline runs.

A *runner* trains on a chunk of minibatches (one optimizer step each) and evaluates:
``SingleRunner`` runs the horizon engine over every block in this process; ``PipelineRunner``
runs this rank's stage of the pipeline runtime. The loop around them (data order, learning
rate, logging, checkpoints, resume) is the same.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpointer
from .config import Config, ConfigError, OptimConfig, validate
from .data import Dataset, load_dataset, minibatches, num_batches
from .distributed import launched_world_size
from .engine import HorizonEngine
from .metrics import MetricsLogger, console, plot_run, print_summary, progress_bar
from .models import BlockModel, build_model
from .plan import Plan
from .runtime import TrainingError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

__all__ = ["TrainingError", "train"]


@dataclass
class Progress:
    """Where training is; saved with every checkpoint."""

    epoch: int = 0
    batch: int = 0  # next batch within the epoch
    step: int = 0  # optimizer steps taken


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is visible; use train.device=auto")
    return torch.device(name)


def build_optimizer(config: OptimConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    optimizer = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(config: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warmup, then constant or cosine decay to zero over ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_step(
    engine: HorizonEngine,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_microbatches: int,
    grad_clip: float = 0.0,
) -> tuple[float, int]:
    """One minibatch: every microbatch forward+backward, then one optimizer step.

    Returns (final-loss value, correct predictions). Raises TrainingError before stepping if the
    loss is not finite, so the weights stay as they were.
    """
    loss, correct = 0.0, 0
    for x, y in zip(inputs.chunk(num_microbatches), targets.chunk(num_microbatches), strict=True):
        result = engine.train_microbatch(x, y, loss_scale=1.0 / num_microbatches)
        loss += result.losses[engine.plan.num_blocks].item()
        correct += (result.logits.argmax(-1) == y).sum().item()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"non-finite loss ({loss})")
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(engine.model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, correct


def _eval_batches(dataset: Dataset, batch_size: int):
    return minibatches(dataset, batch_size, seed=0, epoch=0, shuffle=False, drop_last=False)


class SingleRunner:
    """The horizon engine over every block, in this process."""

    chunk_size = 1
    is_logger = True
    description = "single process"

    def __init__(self, config: Config, model: BlockModel, plan: Plan, device, dtype) -> None:
        self.config, self.model, self.device, self.dtype = config, model, device, dtype
        self.engine = HorizonEngine(model, plan, track_memory=False)
        self.optimizer = build_optimizer(config.optim, model.parameters())

    def run(self, batches, learning_rates: list[float]) -> list[tuple[float, int, int]]:
        """(final loss, correct, samples) per minibatch."""
        results = []
        for (x, y), lr in zip(batches, learning_rates, strict=True):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, correct = train_step(
                self.engine, self.optimizer, x.to(self.device, self.dtype), y.to(self.device),
                self.config.data.num_microbatches, self.config.optim.grad_clip,
            )  # fmt: skip
            results.append((loss, correct, len(y)))
        return results

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        self.model.eval()
        loss, correct = 0.0, 0
        for x, y in _eval_batches(dataset, self.config.data.eval_batch_size):
            logits = self.model(x.to(self.device, self.dtype))
            y = y.to(self.device)
            loss += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
        self.model.train()
        return {"loss": loss / len(dataset), "accuracy": correct / len(dataset)}

    def stage_report(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class _StepLog:
    """The progress bar and the metrics lines (means over the steps since the last line)."""

    def __init__(self, bar, task, logger: MetricsLogger | None, every: int, last: int) -> None:
        self.bar, self.task, self.logger, self.every, self.last = bar, task, logger, every, last
        self.started, self.seen = time.perf_counter(), 0
        self.window = [0.0, 0, 0]  # loss x samples, correct, samples

    def step(self, step: int, batch_size: int, result: tuple | None, lr: float) -> None:
        self.seen += batch_size
        if result is None:  # only the rank holding the last stage sees the loss
            return
        loss, correct, count = result
        self.window = [self.window[0] + loss * count, self.window[1] + correct,
                       self.window[2] + count]  # fmt: skip
        rate = self.seen / (time.perf_counter() - self.started)
        status = f"loss {loss:.4f}  acc {correct / count:.3f}  {rate:,.0f} samples/s"
        self.bar.update(self.task, advance=1, status=status)
        if self.logger and (step % self.every == 0 or step == self.last):
            total_loss, total_correct, samples = self.window
            self.logger.log(
                "train", step, loss=total_loss / samples, accuracy=total_correct / samples,
                lr=lr, samples_per_s=rate,
            )  # fmt: skip
            self.window = [0.0, 0, 0]


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


def train(config: Config, resume: bool = False) -> dict:
    """Train (or resume) the run ``config`` describes; returns the final metrics.

    The one entry point: called in every process, by every launcher. A pipeline config
    (pipeline.stages x pipeline.replicas > 1) needs a launcher that set RANK and WORLD_SIZE.
    """
    validate(config)
    data = config.data
    train_set = load_dataset(
        data.dataset, "train", data.root, data.synthetic_size, config.train.seed
    )
    test_set = load_dataset(data.dataset, "test", data.root, data.synthetic_size, config.train.seed)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, train_set.input_shape, train_set.num_classes)
    plan = Plan(config.horizon.rule, config.horizon.horizon, model.num_blocks)
    launched = launched_world_size()
    if config.world_size == 1 and launched not in (None, 1):
        raise ConfigError(
            f"pipeline.stages x pipeline.replicas = 1, but the launcher started {launched} "
            f"processes; set pipeline.stages/pipeline.replicas to match or start one process"
        )
    if config.world_size == 1:
        device, dtype = resolve_device(config.train.device), DTYPES[config.train.dtype]
        prepare_run_dir(config, resume)
        runner = SingleRunner(config, model.to(device, dtype), plan, device, dtype)
        return _loop(config, runner, train_set, test_set, resume)
    from .pipeline import PipelineRunner

    runner = PipelineRunner.launch(config, model, plan, resume)
    try:
        result = _loop(config, runner, train_set, test_set, resume)
    except BaseException as error:
        runner.fail(error)  # every rank learns who failed; no orderly shutdown after this
        raise
    runner.close()
    return result


def _loop(config: Config, runner, train_set: Dataset, test_set: Dataset, resume: bool) -> dict:
    data, opt = config.data, config.optim
    run_dir = config.run_dir
    checkpointer = Checkpointer(run_dir / "checkpoints", config.run.keep_checkpoints)
    state = Progress()
    if resume:
        state = Progress(**checkpointer.load(checkpointer.latest(), runner.model, runner.optimizer))
    steps_per_epoch = num_batches(train_set, data.batch_size)
    total_steps = config.train.epochs * steps_per_epoch
    stop_at = min(total_steps, config.train.max_steps or total_steps)
    logger = None
    if runner.is_logger:
        logger = MetricsLogger(run_dir, config.run.tensorboard, state.step if resume else None)
    every = config.run.checkpoint_every

    def save() -> None:
        if checkpointer.latest() != checkpointer.directory / f"step_{state.step:08d}":
            checkpointer.save(state.step, runner.model, runner.optimizer, vars(state))

    def evaluate() -> dict:
        nonlocal evaluated_at
        evaluated_at = state.step
        metrics = runner.evaluate(test_set)
        report = runner.stage_report()  # collective in a pipeline
        stages.update(report)
        if logger is not None:
            logger.log("eval", state.step, epoch=state.epoch, **metrics, **report)
        return metrics

    final, evaluated_at, stages = {}, -1, {}
    with progress_bar(config.run.progress and runner.is_logger) as bar:
        log = _StepLog(bar, bar.add_task("train", total=stop_at, completed=state.step, status=""),
                       logger, config.train.log_every, stop_at)  # fmt: skip
        while state.epoch < config.train.epochs and state.step < stop_at:
            batches = minibatches(
                train_set, data.batch_size, config.train.seed, state.epoch, start_batch=state.batch
            )
            while state.batch < steps_per_epoch and state.step < stop_at:
                # A chunk ends at the epoch's end, at stop_at and at the next checkpoint.
                size = min(runner.chunk_size, steps_per_epoch - state.batch, stop_at - state.step)
                if every:
                    size = min(size, every - state.step % every)
                chunk = [next(batches) for _ in range(size)]
                lrs = [learning_rate(opt, state.step + j, total_steps) for j in range(size)]
                try:
                    results = runner.run(chunk, lrs)
                except TrainingError as error:
                    raise TrainingError(
                        f"{error} in steps {state.step}-{state.step + size - 1} (epoch "
                        f"{state.epoch}); weights not updated, last good checkpoint kept: "
                        f"{checkpointer.latest()}; lower optim.lr or set optim.grad_clip"
                    ) from None
                for j in range(size):
                    state.step, state.batch = state.step + 1, state.batch + 1
                    log.step(state.step, data.batch_size, results[j] if results else None, lrs[j])
                if every and state.step % every == 0:
                    save()
            if state.batch == steps_per_epoch:
                state.epoch, state.batch = state.epoch + 1, 0
                final = evaluate()
                if runner.is_logger:
                    console.print(
                        f"epoch {state.epoch}: test accuracy {100 * final['accuracy']:.2f}%  "
                        f"test loss {final['loss']:.4f}"
                    )
            save()
    if evaluated_at != state.step:  # stopped mid-epoch (max_steps): evaluate where we are
        final = evaluate()
    elapsed = time.perf_counter() - log.started
    if logger is None:
        return final
    logger.close()
    plan = runner.engine.plan
    summary = {
        "run": str(run_dir),
        "plan": f"{plan.rule} h={plan.horizon} of T={plan.num_blocks}",
        "processes": runner.description,
        "steps": state.step,
        "train time (s)": elapsed,
        "samples/s": log.seen / elapsed if elapsed else 0.0,
        "test loss": final["loss"],
        "test accuracy": final["accuracy"],
    }
    if stages:
        pairs = zip(stages["stage_busy_s"], stages["stage_idle_s"], strict=True)
        summary["stage busy / idle (s)"] = "  ".join(f"{b:.1f}/{i:.1f}" for b, i in pairs)
        summary["stage peak activations (MiB)"] = "  ".join(
            f"{m:.2f}" for m in stages["stage_peak_activation_mib"]
        )
    if config.run.plot:
        summary["plot"] = str(plot_run(logger.path, run_dir / "plot.png", summary["plan"]))
    print_summary(f"mpc_dist: {config.model.name} on {data.dataset}", summary)
    return summary
