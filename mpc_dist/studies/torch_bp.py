"""Back-propagation under ``torch.distributed.pipelining``'s schedules, on our network and our
data: the baseline row of `mpc-dist data-study` (docs/data.md).

Every rank of a P-process gloo group builds the run's model exactly as our trainer does (the
same meta structure, ``instantiate`` with the run's seed, so the same initial weights) and hands
its stage(s) to torch: ``PipelineStage`` over blocks [a, b) (the stem with block 0, the head
with block T - 1), and one of torch's schedule classes with the cross-entropy loss. The first
stage reads the minibatches through our ``Loader`` (augmentation and mixup included); the
targets go from it to the rank holding the last stage. AdamW (or the config's optimizer) with
our learning-rate schedule steps after each ``schedule.step``, and the test set is evaluated at
the steps our trainer evaluates at (outside the clock: its records are ``metrics.jsonl``'s).
So the run computes what our single-process back-propagation computes
(``tests/test_data_study.py`` checks the weights in float64), under torch's schedule.

``probe`` first times every schedule asked for on this network (a few real minibatches, rounds
taking turns) and ``fit`` trains under the fastest: "torch's best schedule".
Run with torchrun: ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
mpc_dist.studies.torch_bp --config RUN/config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import Config, load_config
from ..data import Loader, Shard, mixes
from ..devices import dtype_of
from ..models import BlockModel, build_model, instantiate
from ..train import build_optimizer, open_run
from ..train.metrics import MetricsLogger
from ..train.runner import evaluate
from ..train.step import learning_rate

LOOPED = ("ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble")
V_SHAPED = ("ScheduleZBVZeroBubble", "ScheduleDualPipeV")
SCHEDULES = ("Schedule1F1B", "ScheduleGPipe", *LOOPED, *V_SHAPED)


def stage_ids(schedule: str, world: int, rank: int) -> list[int]:
    """The stages rank ``rank`` holds: one per rank, or two (looped: r and r + P; in a V:
    r and 2P - 1 - r, so rank 0 holds the first and the last)."""
    if schedule in V_SHAPED:
        return [rank, 2 * world - 1 - rank]
    if schedule in LOOPED:
        return [rank, rank + world]
    return [rank]


class StagePart(nn.Module):
    """Blocks [first, last) of ``model`` (shared, not copied), with the stem before block 0 and
    the head after block T - 1."""

    def __init__(self, model: BlockModel, first: int, last: int) -> None:
        super().__init__()
        self.part, self.first, self.last = model.split(first, last), first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for t in range(self.first, self.last):
            x = self.part.block_forward(t, x)
        if self.last == self.part.num_blocks:
            return self.part.head(x)
        return x.contiguous()  # torch sends it as is, and gloo sends only contiguous tensors


def boundary_shapes(model: BlockModel, microbatch: int, dtype: torch.dtype) -> list[torch.Size]:
    """Shapes of a microbatch before block 0, after each block, and of the logits."""
    x = torch.zeros(microbatch, *model.input_shape, dtype=dtype)
    shapes = [x.shape]
    with torch.no_grad():
        for t in range(model.num_blocks):
            x = model.block_forward(t, x)
            shapes.append(x.shape)
        shapes.append(model.head(x).shape)
    return shapes


class Pipe:
    """This rank's stages of ``model`` under torch's ``schedule``."""

    def __init__(self, model: BlockModel, schedule: str, microbatch: int, m: int) -> None:
        from torch.distributed.pipelining import PipelineStage, schedules

        world, rank = dist.get_world_size(), dist.get_rank()
        ids = stage_ids(schedule, world, rank)
        num_stages, T = world * len(ids), model.num_blocks
        if T % num_stages:
            raise ValueError(f"{schedule}: {T} blocks do not split into {num_stages} stages")
        per, dtype = T // num_stages, next(model.parameters()).dtype
        shapes = boundary_shapes(model, microbatch, dtype)
        self.parts = [StagePart(model, k * per, (k + 1) * per) for k in ids]
        stages = [
            PipelineStage(
                part,
                k,
                num_stages,
                torch.device("cpu"),
                input_args=torch.empty(shapes[k * per], dtype=dtype).requires_grad_(k > 0),
                output_args=torch.empty(
                    shapes[-1] if k == num_stages - 1 else shapes[(k + 1) * per], dtype=dtype
                ).requires_grad_(),
            )
            for part, k in zip(self.parts, ids, strict=True)
        ]
        self.schedule = getattr(schedules, schedule)(
            stages if len(stages) > 1 else stages[0], n_microbatches=m, loss_fn=F.cross_entropy
        )
        self.first, self.last = 0 in ids, num_stages - 1 in ids
        self.last_rank = 0 if schedule in V_SHAPED else world - 1

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> None:
        """One minibatch through the schedule: forward, backward, gradients averaged over the
        microbatches (torch's ``scale_grads``)."""
        args = (inputs,) if self.first else ()
        kwargs = {"target": targets} if self.last else {}
        self.schedule.step(*args, return_outputs=False, **kwargs)


def fresh_model(config: Config, source_shape: tuple, classes: int) -> BlockModel:
    """The run's model as our trainer builds it: same structure, same initial weights."""
    torch.manual_seed(config.train.seed)
    meta = build_model(config.model, source_shape, classes, device="meta")
    return instantiate(meta, "cpu", dtype_of(config.train.dtype), config.train.seed)


def broadcast_targets(targets: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Rank 0's targets (it reads the minibatches) on every rank."""
    buffer = targets if dist.get_rank() == 0 else torch.empty_like(like)
    dist.broadcast(buffer, src=0)
    return buffer


def _target_example(config: Config, classes: int) -> torch.Tensor:
    """A buffer shaped like a minibatch's targets: soft (B, C) with mixing, else labels (B,)."""
    n, dtype = config.data.batch_size, dtype_of(config.train.dtype)
    if mixes(config.augment):
        return torch.empty(n, classes, dtype=dtype)
    return torch.empty(n, dtype=torch.int64)


def _batches(config: Config, loader: Loader) -> Iterator[tuple]:
    """(inputs, targets) in the trainer's dtype, epoch after epoch: inputs on rank 0 only."""
    dtype = dtype_of(config.train.dtype)
    for epoch in range(config.train.epochs):
        for x, y in loader.epoch(epoch):
            if x is not None:
                x = x.to(dtype)
                y = y.to(dtype) if y.is_floating_point() else y
            yield x, y


def probe(config: Config, loader: Loader, schedules: list[str], steps: int, rounds: int) -> dict:
    """Median seconds per training step of each schedule on fresh copies of the model (rank 0's
    clock between barriers), rounds taking turns; an error where one cannot run."""
    d, source = config.data, loader.source
    like = _target_example(config, source.num_classes)
    batches = _batches(config, loader)
    fixed = [next(batches) for _ in range(steps)]
    fixed = [(x, broadcast_targets(y, like)) for x, y in fixed]  # any layout's last stage
    pipes, times, errors = {}, {s: [] for s in schedules}, {}
    for name in schedules:
        try:
            model = fresh_model(config, source.input_shape, source.num_classes)
            pipes[name] = (
                Pipe(model, name, d.batch_size // d.num_microbatches, d.num_microbatches),
                model,
            )
        except (ValueError, RuntimeError) as error:
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    for _ in range(rounds):
        for name, (pipe, model) in pipes.items():
            optimizer = build_optimizer(config.optim, model.parameters())
            pipe.step(*fixed[0])  # warm-up, untimed
            optimizer.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            for x, y in fixed:
                pipe.step(x, y)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            dist.barrier()
            times[name].append((time.perf_counter() - start) / steps)
    seconds = torch.tensor([statistics.median(times[n]) if times[n] else -1.0 for n in schedules])
    dist.broadcast(seconds, src=0)
    result = {n: {"step_s": float(s)} for n, s in zip(schedules, seconds, strict=True) if s >= 0}
    return {**result, **{n: {"error": e} for n, e in errors.items()}}


def gather_weights(model: BlockModel, pipe: Pipe) -> None:
    """Every rank's trained parts copied into rank 0's whole model (for evaluation)."""
    mine = {k: v for part in pipe.parts for k, v in part.part.state_dict().items()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        for other in gathered[1:]:
            model.load_state_dict(other, strict=False)


def fit(config: Config, schedule: str, out_dir) -> dict:
    """Train the run under ``schedule``: the loop's data order, learning rates, evaluation steps
    (epoch ends and every ``train.eval_every``), records and final weights in ``out_dir``."""
    _, train_source, test_source = open_run(config)
    rank, d, seed = dist.get_rank(), config.data, config.train.seed
    model = fresh_model(config, train_source.input_shape, train_source.num_classes)
    pipe = Pipe(model, schedule, d.batch_size // d.num_microbatches, d.num_microbatches)
    optimizer = build_optimizer(config.optim, pipe.parameters())
    shard = Shard(0, 1, inputs=rank == 0)
    loader = Loader(train_source, d, config.augment, "train", seed, shard, d.num_microbatches)
    test = Loader(test_source, d, config.augment, "test", seed) if rank == 0 else None
    like = _target_example(config, train_source.num_classes)
    per_epoch = loader.batches_per_epoch
    total = config.train.epochs * per_epoch
    stop = min(total, config.train.max_steps or total)
    logger = MetricsLogger(out_dir, tensorboard=False) if rank == 0 else None
    every = config.train.eval_every
    for step, (x, y) in enumerate(_batches(config, loader), start=1):
        if step > stop:
            break
        pipe.step(x, y if pipe.last_rank == 0 else broadcast_targets(y, like))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config.optim, step - 1, total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if logger is not None:
            logger.log("train", step)
        if step % per_epoch == 0 or (every and step % every == 0) or step == stop:
            _evaluate(model, pipe, test, logger, step, loader)
    gather_weights(model, pipe)
    if rank == 0:
        logger.close()
        torch.save(model.state_dict(), out_dir / "final.pt")
    return {"steps": stop}


def _evaluate(model, pipe: Pipe, test: Loader | None, logger, step: int, train: Loader) -> None:
    """The test set through rank 0's whole model (the other ranks' weights gathered first); the
    record also holds the seconds rank 0 has waited for training data so far."""
    gather_weights(model, pipe)
    if dist.get_rank() == 0:
        dtype = next(model.parameters()).dtype
        forward = lambda x, y: (model(x.to(dtype)), y)  # noqa: E731
        loss, top1, top5 = evaluate(model, forward, test)
        n = len(test.source)
        epoch, wait = step // train.batches_per_epoch, train.stats()["wait_s"]
        logger.log(
            "eval",
            step,
            epoch=epoch,
            loss=loss / n,
            accuracy=top1 / n,
            top5=top5 / n,
            data_wait_s=wait,
        )
    dist.barrier()


def run(config: Config, schedules: list[str], probe_steps: int, probe_rounds: int) -> dict:
    """Probe ``schedules`` (unless only one is asked for), train under the fastest; rank 0 writes
    ``torch.json`` beside the records."""
    out_dir = config.run_dir
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    if len(schedules) > 1:
        _, source, _ = open_run(config)
        d, rank = config.data, dist.get_rank()
        shard = Shard(0, 1, inputs=rank == 0)
        loader = Loader(
            source, d, config.augment, "train", config.train.seed, shard, d.num_microbatches
        )
        timings = probe(config, loader, schedules, probe_steps, probe_rounds)
    timed = {n: t["step_s"] for n, t in timings.items() if "step_s" in t}
    chosen = min(timed, key=timed.get) if timed else schedules[0]
    dist.barrier()
    result = {"schedule": chosen, "probe": timings, **fit(config, chosen, out_dir)}
    if dist.get_rank() == 0:
        (out_dir / "torch.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config.yaml")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="torch's class names")
    parser.add_argument("--probe-steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--probe-rounds", type=int, default=3)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        config = load_config(args.config, [])
        run(config, args.schedules.split(","), args.probe_steps, args.probe_rounds)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
