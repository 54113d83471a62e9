"""Single-process trainer: the horizon engine over every block, on one device."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpointer
from .config import Config, ConfigError, OptimConfig, validate
from .data import Dataset, load_dataset, minibatches, num_batches
from .engine import HorizonEngine
from .metrics import MetricsLogger, plot_run, print_summary, progress_bar
from .models import BlockModel, build_model
from .plan import Plan

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class TrainingError(RuntimeError):
    pass


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


@torch.no_grad()
def evaluate(model: BlockModel, dataset: Dataset, batch_size: int, device, dtype) -> dict:
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for x, y in minibatches(dataset, batch_size, seed=0, epoch=0, shuffle=False, drop_last=False):
        logits = model(x.to(device, dtype))
        y = y.to(device)
        loss += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train(was_training)
    return {"loss": loss / len(dataset), "accuracy": correct / len(dataset)}


def prepare_run_dir(config: Config, resume: bool) -> Path:
    run_dir = config.run_dir
    checkpoints = run_dir / "checkpoints"
    if not resume and any(checkpoints.glob("step_*")):
        raise ConfigError(
            f"run.name={config.run.name}: {run_dir} already holds checkpoints; pass --resume to "
            f"continue it or choose another run.name"
        )
    if resume and not any(checkpoints.glob("step_*")):
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    return run_dir


def train(config: Config, resume: bool = False) -> dict:
    """Train (or resume) the run ``config`` describes; returns the final metrics."""
    validate(config)
    device, dtype = resolve_device(config.train.device), DTYPES[config.train.dtype]
    data, opt = config.data, config.optim
    train_set = load_dataset(
        data.dataset, "train", data.root, data.synthetic_size, config.train.seed
    )
    test_set = load_dataset(data.dataset, "test", data.root, data.synthetic_size, config.train.seed)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, train_set.input_shape, train_set.num_classes)
    model = model.to(device, dtype)
    plan = Plan(config.horizon.rule, config.horizon.horizon, model.num_blocks)
    engine = HorizonEngine(model, plan, track_memory=False)
    optimizer = build_optimizer(opt, model.parameters())
    run_dir = prepare_run_dir(config, resume)
    checkpointer = Checkpointer(run_dir / "checkpoints", config.run.keep_checkpoints)

    state = Progress()
    if resume:
        state = Progress(**checkpointer.load(checkpointer.latest(), model, optimizer))
    steps_per_epoch = num_batches(train_set, data.batch_size)
    total_steps = config.train.epochs * steps_per_epoch
    stop_at = min(total_steps, config.train.max_steps or total_steps)
    logger = MetricsLogger(run_dir, config.run.tensorboard, state.step if resume else None)

    def save() -> None:
        if checkpointer.latest() != checkpointer.directory / f"step_{state.step:08d}":
            checkpointer.save(state.step, model, optimizer, vars(state))

    final = {}
    started, seen = time.perf_counter(), 0
    window = [0.0, 0, 0]  # loss sum, correct, samples since the last metrics line
    with progress_bar(config.run.progress) as bar:
        task = bar.add_task("train", total=stop_at, completed=state.step, status="")
        while state.epoch < config.train.epochs and state.step < stop_at:
            batches = minibatches(
                train_set, data.batch_size, config.train.seed, state.epoch, start_batch=state.batch
            )
            for x, y in batches:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(opt, state.step, total_steps)
                try:
                    loss, correct = train_step(
                        engine, optimizer, x.to(device, dtype), y.to(device),
                        data.num_microbatches, opt.grad_clip,
                    )  # fmt: skip
                except TrainingError as error:
                    kept = checkpointer.latest()
                    raise TrainingError(
                        f"{error} at step {state.step} (epoch {state.epoch}); weights not updated, "
                        f"last good checkpoint kept: {kept}; lower optim.lr or set optim.grad_clip"
                    ) from None
                state.step, state.batch, seen = state.step + 1, state.batch + 1, seen + len(y)
                window = [window[0] + loss * len(y), window[1] + correct, window[2] + len(y)]
                rate = seen / (time.perf_counter() - started)
                status = f"loss {loss:.4f}  acc {correct / len(y):.3f}  {rate:,.0f} samples/s"
                bar.update(task, advance=1, status=status)
                if state.step % config.train.log_every == 0 or state.step == stop_at:
                    logger.log("train", state.step, loss=window[0] / window[2],
                               accuracy=window[1] / window[2],
                               lr=optimizer.param_groups[0]["lr"], samples_per_s=rate)  # fmt: skip
                    window = [0.0, 0, 0]
                if config.run.checkpoint_every and state.step % config.run.checkpoint_every == 0:
                    save()
                if state.step >= stop_at and state.batch < steps_per_epoch:
                    break  # max_steps reached mid-epoch
            else:
                state.epoch, state.batch = state.epoch + 1, 0
                final = evaluate(model, test_set, data.eval_batch_size, device, dtype)
                logger.log("eval", state.step, epoch=state.epoch, **final)
                bar.console.print(
                    f"epoch {state.epoch}: test accuracy {100 * final['accuracy']:.2f}%  "
                    f"test loss {final['loss']:.4f}"
                )
            save()
    if not final:  # stopped mid-epoch (max_steps): evaluate where we are
        final = evaluate(model, test_set, data.eval_batch_size, device, dtype)
        logger.log("eval", state.step, epoch=state.epoch, **final)
    logger.close()
    elapsed = time.perf_counter() - started
    summary = {
        "run": str(run_dir),
        "plan": f"{plan.rule} h={plan.horizon} of T={plan.num_blocks}",
        "steps": state.step,
        "train time (s)": elapsed,
        "samples/s": seen / elapsed if elapsed else 0.0,
        "test loss": final["loss"],
        "test accuracy": final["accuracy"],
    }
    if config.run.plot:
        summary["plot"] = str(plot_run(logger.path, run_dir / "plot.png", summary["plan"]))
    print_summary(f"mpc_dist: {config.model.name} on {data.dataset}", summary)
    return summary
