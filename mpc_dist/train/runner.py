"""Runners: what the training loop drives. ``SingleRunner`` runs the horizon engine over every
block in this process; ``PipelineRunner`` runs this rank's stage of a P x D pipeline. Both train
a chunk of minibatches (one optimizer step each) with the same step, and evaluate the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import Config
from ..core import EngineOptions, Plan
from ..data import Loader, Shard, mixes
from ..devices import dtype_of, resolve_device
from ..models import BlockModel, instantiate
from ..parallel import Groups, RuntimeOptions, partition, stage_ranges
from ..rules import make_engine
from .bootstrap import Job
from .callbacks import Callback
from .precision import FSDP_PARAM_DTYPES, compute_options, grad_scaler
from .stage import build_stage, schedule_spec
from .step import OptimizerStep, build_optimizer

Batch = tuple[torch.Tensor | None, torch.Tensor]  # inputs (where the runner reads them), targets
StepResult = tuple[float, int, int]  # final loss, correct predictions, samples
COMPILING_CALLS = 2  # train.compile: blocks compiles in the first two training calls, not later


class Runner(Protocol):
    model: BlockModel  # what this process holds and checkpoints
    optimizer: torch.optim.Optimizer
    plan: Plan
    chunk_size: int  # minibatches per run() call
    shard: Shard  # what this process reads of each minibatch
    device: torch.device
    is_logger: bool  # this process sees the final loss and writes the run's metrics
    description: str

    def run(self, batches: list[Batch], learning_rates: list[float]) -> list[StepResult]:
        """One optimizer step per minibatch; results where the final loss is seen, else []."""

    def evaluate(self, data: Loader) -> dict[str, float]: ...

    def data_report(self, stats: dict) -> dict:
        """The reading process's loader statistics, on every process (collective)."""

    def stage_report(self) -> dict[str, list[float]]: ...

    def note(self, phase: str, step: int) -> None:
        """What the loop does now, after ``step`` optimizer steps (for the flight record)."""

    def fail(self, error: BaseException) -> None: ...

    def close(self) -> None: ...


Forward = Callable[[torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, ...] | None]


@torch.no_grad()
def evaluate(model: torch.nn.Module, forward: Forward, data: Loader) -> list[float]:
    """Summed loss, top-1 and top-5 correct predictions over this process's part of ``data``;
    ``forward(inputs, targets)`` returns the logits and the targets (None on a pipeline rank
    without the head; data only where this process reads it)."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0, 0]
    for x, y in data.epoch(0):
        out = forward(x, y)
        if out is None:  # a pipeline rank that does not hold the head
            continue
        logits, y = out
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == y.to(logits.device).unsqueeze(-1)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").item()
        sums[1] += int(hits[:, 0].sum())
        sums[2] += int(hits.any(-1).sum())
    model.train(was_training)
    return sums


def _metrics(sums: list[float], samples: int) -> dict[str, float]:
    loss, top1, top5 = sums
    return {"loss": loss / samples, "accuracy": top1 / samples, "top5": top5 / samples}


class SingleRunner:
    """The horizon engine over every block, in this process."""

    chunk_size = 1
    shard = Shard()
    is_logger = True
    description = "single process"

    def __init__(
        self, config: Config, model: BlockModel, plan: Plan, callbacks: Sequence[Callback] = ()
    ) -> None:
        self.config, self.plan = config, plan
        self.device, self.dtype = resolve_device(config.train.device), dtype_of(config.train.dtype)
        m = config.model
        self.model = instantiate(
            model, self.device, self.dtype, config.train.seed, m.weights, m.lora
        )
        self.compute = compute_options(config.train, self.device)
        self.optimizer = build_optimizer(config.optim, self.model.parameters())
        self.step = OptimizerStep(
            self.optimizer,
            config.optim.grad_clip,
            callbacks=callbacks,
            scaler=grad_scaler(self.compute, self.device),
            on_nonfinite=config.optim.on_nonfinite,
        )
        self.set_plan(plan)

    def set_plan(self, plan: Plan) -> None:
        """Train on under another plan (horizon re-selection)."""
        self.plan = plan
        options = EngineOptions(
            self.compute,
            track_memory=False,
            scale_loss=self.step.scale_loss,
            seed=self.config.train.seed,
            rules=self.config.rules,
        )
        self.engine = make_engine(self.model, plan, options)

    def run(self, batches: list[Batch], learning_rates: list[float]) -> list[StepResult]:
        m, T = self.config.data.num_microbatches, self.plan.num_blocks
        results = []
        for (inputs, targets), lr in zip(batches, learning_rates, strict=True):
            inputs, targets = inputs.to(self.device, self.dtype), targets.to(self.device)
            loss = torch.zeros((), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.int64, device=self.device)
            labels = targets.argmax(-1) if targets.is_floating_point() else targets
            if targets.is_floating_point():  # soft targets: in the parameters' dtype
                targets = targets.to(self.dtype)
            for x, y, k in zip(inputs.chunk(m), targets.chunk(m), labels.chunk(m), strict=True):
                result = self.engine.train_microbatch(x, y, loss_scale=1.0 / m)
                loss += result.losses[T].double()
                correct += (result.logits.argmax(-1) == k).sum()
            self.step(loss, lr)
            results.append((loss.item(), int(correct), len(targets)))
        return results

    def evaluate(self, data: Loader) -> dict[str, float]:
        def forward(x: torch.Tensor, y: torch.Tensor):
            return self.engine.infer(x.to(self.device, self.dtype)), y.to(self.device)

        return _metrics(evaluate(self.model, forward, data), len(data.source))

    def data_report(self, stats: dict) -> dict:
        return stats

    def stage_report(self) -> dict[str, list[float]]:
        return {}

    def note(self, phase: str, step: int) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass

    def close(self) -> None:
        pass


class PipelineRunner:
    """This rank's stage of a P x D pipeline; the training loop drives it like SingleRunner."""

    def __init__(
        self,
        config: Config,
        model: BlockModel,
        plan: Plan,
        job: Job,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        """Partition the blocks and build this rank's stage of the joined ``job``."""
        p, topology = config.pipeline, job.topology
        self.topology, self.watchdog = topology, job.watchdog
        try:
            # compiling, a stage's first steps can outlast pipeline.timeout; its messages wait
            # as long as collectives until COMPILING_CALLS calls are done
            first_timeout = p.collective_timeout if config.train.compile == "blocks" else p.timeout
            groups = Groups.create(topology, first_timeout, p.collective_timeout)
            groups.warm_up(job.device)
            dtype = dtype_of(config.train.dtype)
            compute = compute_options(config.train, job.device)
            counts = job.from_rank_zero(lambda: self._partition(config, model, job, compute))
            ranges = stage_ranges(counts)
            runtime = RuntimeOptions(
                schedule=schedule_spec(config),
                device=job.device,
                dtype=dtype,
                soft_targets=mixes(config.augment),
            )
            stage = build_stage(
                model=model,
                plan=plan,
                ranges=ranges,
                groups=groups,
                optim=config.optim,
                runtime=runtime,
                compute=compute,
                seed=config.train.seed,
                spec=config.model,
                sharding=p.sharding,
                callbacks=callbacks,
                rules=config.rules,
                fsdp_param_dtype=FSDP_PARAM_DTYPES[p.fsdp_param_dtype],
            )
            dist.barrier()
        except BaseException as error:
            self.watchdog.fail(error)
            raise
        self.config, self.plan, self.runtime, self.groups = config, plan, stage.runtime, groups
        self.calls = 0
        self.device = job.device
        self.watchdog.watch(stage.runtime.flight)
        if config.train.compile == "blocks":  # the watchdog waits for messages as long, too
            self.watchdog.set_message_timeout(first_timeout, "pipeline.collective_timeout")
        self.model, self.optimizer = stage.model, stage.optimizer
        self.chunk_size = p.async_window if p.mode == "async" else 1
        self.shard = Shard(topology.replica, p.replicas, inputs=topology.stage == 0)
        self.is_logger = topology.is_last_stage and topology.replica == 0
        self.description = (
            f"{topology.stages} stages x {topology.replicas} replicas, {p.mode}, blocks {ranges}"
        )
        self._closed = False

    @staticmethod
    def _partition(config: Config, model: BlockModel, job: Job, compute) -> list[int]:
        """Blocks per stage (rank 0 decides: a timed partition must be the same everywhere)."""
        d, dtype = config.data, dtype_of(config.train.dtype)
        microbatch = d.batch_size // (d.num_microbatches * config.pipeline.replicas)
        sample = torch.randn(microbatch, *model.input_shape)
        return partition(config.pipeline, model, sample, job.device, dtype, compute)

    def run(self, batches: list[Batch], learning_rates: list[float]) -> list[StepResult]:
        share = self.config.data.batch_size // self.topology.replicas
        results = self.runtime.run(batches, learning_rates, batch_size=share)
        self.calls += 1
        if self.calls == COMPILING_CALLS and self.config.train.compile == "blocks":
            dist.barrier()  # every rank is done compiling before any waits less
            self.groups.set_message_timeout(self.config.pipeline.timeout)
            self.watchdog.set_message_timeout(self.config.pipeline.timeout)
        return [(loss, correct, share) for loss, correct in results]

    def evaluate(self, data: Loader) -> dict[str, float]:
        """Every replica evaluates its share of each test batch (as it trains on its share);
        the last stages' sums are added up."""
        mine = evaluate(self.model, self.runtime.infer, data)
        gathered: list = [None] * self.topology.world_size
        dist.all_gather_object(gathered, mine)
        t = self.topology
        last = [gathered[t.rank_of(t.stages - 1, d)] for d in range(t.replicas)]
        return _metrics([sum(column) for column in zip(*last, strict=True)], len(data.source))

    def data_report(self, stats: dict) -> dict:
        """The first stages read the data: their waits summed over replicas (replica 0's
        bottleneck is everyone's), their skipped images added up."""
        gathered: list = [None] * self.topology.world_size
        dist.all_gather_object(gathered, stats)
        t = self.topology
        first = [gathered[t.rank_of(0, d)] for d in range(t.replicas)]
        return {
            "wait_s": max(s["wait_s"] for s in first),
            "skipped": sum(s["skipped"] for s in first),
            "skipped_files": [f for s in first for f in s["skipped_files"]][:20],
        }

    def stage_report(self) -> dict[str, list[float]]:
        """Per-stage busy and idle seconds and peak activation MiB (replica 0), on every rank."""
        times, memory = self.runtime.times, self.runtime.engine.memory
        mine = (times.busy, max(0.0, times.wall - times.busy), memory.peak_bytes / 2**20)
        gathered: list = [None] * self.topology.world_size
        dist.all_gather_object(gathered, mine)
        rows = [gathered[self.topology.rank_of(k, 0)] for k in range(self.topology.stages)]
        return {
            "stage_busy_s": [round(r[0], 3) for r in rows],
            "stage_idle_s": [round(r[1], 3) for r in rows],
            "stage_peak_activation_mib": [round(r[2], 3) for r in rows],
        }

    def note(self, phase: str, step: int) -> None:
        self.runtime.flight.note(phase, step)

    def fail(self, error: BaseException) -> None:
        """Every rank learns who failed; no orderly shutdown after this."""
        self.watchdog.fail(error)

    def close(self) -> None:
        """Orderly shutdown: nobody leaves before everyone is done (rank 0 may host the store)."""
        if self._closed:
            return
        self._closed = True
        dist.barrier()
        self.watchdog.stop()
        if self.topology.rank == 0:  # it may host the store: the last to leave
            self.watchdog.wait_until_all_done()
        dist.destroy_process_group()
