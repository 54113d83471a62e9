"""Runners: what the training loop drives. ``SingleRunner`` runs the horizon engine over every
block in this process; ``PipelineRunner`` runs this rank's stage of a P x D pipeline. Both train
a chunk of minibatches (one optimizer step each) with the same step, and evaluate the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import Config, ConfigError
from ..core import Plan
from ..models import BlockModel, instantiate
from ..parallel import (
    Groups,
    RuntimeOptions,
    Topology,
    Watchdog,
    check_same_config,
    device_and_backend,
    init_process_group,
    launched_world_size,
    partition,
    place_ranks,
    stage_ranges,
)
from ..rules import make_engine
from .callbacks import Callback
from .data import WHOLE, Dataset, Shard, minibatches
from .precision import compute_options, grad_scaler
from .stage import build_stage
from .step import OptimizerStep, build_optimizer

SELECTION_TIMEOUT_S = 4 * 3600  # the longest horizon selection a pipeline waits for
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

Batch = tuple[torch.Tensor | None, torch.Tensor]  # inputs (where the runner reads them), targets
StepResult = tuple[float, int, int]  # final loss, correct predictions, samples


class Runner(Protocol):
    model: BlockModel  # what this process holds and checkpoints
    optimizer: torch.optim.Optimizer
    plan: Plan
    chunk_size: int  # minibatches per run() call
    shard: Shard  # what this process reads of each minibatch
    is_logger: bool  # this process sees the final loss and writes the run's metrics
    description: str

    def run(self, batches: list[Batch], learning_rates: list[float]) -> list[StepResult]:
        """One optimizer step per minibatch; results where the final loss is seen, else []."""

    def evaluate(self, dataset: Dataset) -> dict[str, float]: ...

    def stage_report(self) -> dict[str, list[float]]: ...

    def fail(self, error: BaseException) -> None: ...

    def close(self) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is visible; use train.device=auto")
    return torch.device(name)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    forward: Callable[[torch.Tensor | None, int], torch.Tensor | None],
    dataset: Dataset,
    batch_size: int,
    shard: Shard = WHOLE,
) -> tuple[float, int]:
    """Summed loss and correct predictions over ``dataset`` (this replica's ``shard`` of every
    batch); ``forward(inputs, batch_size)`` returns logits (None on a pipeline rank without the
    head; inputs only where the shard reads them)."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    batches = minibatches(dataset, batch_size, 0, 0, shuffle=False, drop_last=False, shard=shard)
    for x, y in batches:
        logits = forward(x, len(y))
        if logits is None:  # a pipeline rank that does not hold the head
            continue
        y = y.to(logits.device)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return loss, correct


class SingleRunner:
    """The horizon engine over every block, in this process."""

    chunk_size = 1
    shard = WHOLE
    is_logger = True
    description = "single process"

    def __init__(
        self, config: Config, model: BlockModel, plan: Plan, callbacks: Sequence[Callback] = ()
    ) -> None:
        self.config, self.plan = config, plan
        self.device, self.dtype = resolve_device(config.train.device), DTYPES[config.train.dtype]
        m = config.model
        self.model = instantiate(
            model, self.device, self.dtype, config.train.seed, m.weights, m.lora
        )
        self.compute = compute_options(config.train, self.device)
        self.optimizer = build_optimizer(config.optim, self.model.parameters())
        self.step = OptimizerStep(
            self.optimizer, config.optim.grad_clip, callbacks=callbacks,
            scaler=grad_scaler(self.compute, self.device),
        )  # fmt: skip
        self.set_plan(plan)

    def set_plan(self, plan: Plan) -> None:
        """Train on under another plan (horizon re-selection)."""
        self.plan = plan
        self.engine = make_engine(self.model, plan, False, self.compute, self.step.scale_loss,
                                  self.config.train.seed, self.config.rules)  # fmt: skip

    def run(self, batches: list[Batch], learning_rates: list[float]) -> list[StepResult]:
        m, T = self.config.data.num_microbatches, self.plan.num_blocks
        results = []
        for (inputs, targets), lr in zip(batches, learning_rates, strict=True):
            inputs, targets = inputs.to(self.device, self.dtype), targets.to(self.device)
            loss = torch.zeros((), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.int64, device=self.device)
            for x, y in zip(inputs.chunk(m), targets.chunk(m), strict=True):
                result = self.engine.train_microbatch(x, y, loss_scale=1.0 / m)
                loss += result.losses[T].double()
                correct += (result.logits.argmax(-1) == y).sum()
            self.step(loss, lr)
            results.append((loss.item(), int(correct), len(targets)))
        return results

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        def forward(x: torch.Tensor, batch_size: int) -> torch.Tensor:
            return self.engine.infer(x.to(self.device, self.dtype))

        loss, correct = evaluate(self.model, forward, dataset, self.config.data.eval_batch_size)
        return {"loss": loss / len(dataset), "accuracy": correct / len(dataset)}

    def stage_report(self) -> dict[str, list[float]]:
        return {}

    def fail(self, error: BaseException) -> None:
        pass

    def close(self) -> None:
        pass


def _launch_hint(config: Config) -> str:
    n = config.world_size
    return (
        f"run `mpc-dist train --nproc {n} ...`, `torchrun --nproc-per-node {n} launch/train.py "
        f"...`, or `accelerate launch --multi_gpu --num_processes {n} launch/train.py ...` "
        f"(with ACCELERATE_USE_CPU=true on CPU)"
    )


def check_world_size(config: Config) -> None:
    """The processes the launcher started must be the config's P x D (one when not launched)."""
    world, p = launched_world_size(), config.pipeline
    if config.world_size == 1 and world not in (None, 1):
        raise ConfigError(
            f"pipeline.stages x pipeline.replicas = 1, but the launcher started {world} "
            f"processes; set pipeline.stages/pipeline.replicas to match or start one process"
        )
    if config.world_size > 1 and world is None:
        raise ConfigError(
            f"pipeline.stages={p.stages}, pipeline.replicas={p.replicas}: this needs "
            f"{config.world_size} processes; {_launch_hint(config)}"
        )
    if config.world_size > 1 and world != config.world_size:
        raise ConfigError(
            f"pipeline.stages x pipeline.replicas = {config.world_size}, but the launcher "
            f"started {world} processes; {_launch_hint(config)}"
        )


class PipelineRunner:
    """This rank's stage of a P x D pipeline; the training loop drives it like SingleRunner."""

    def __init__(
        self,
        config: Config,
        model: BlockModel,
        choose: Callable[[], Plan],
        on_ready: Callable[[Topology], None] = lambda topology: None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        """Join the job, start the watchdog, wire this rank's stage. ``on_ready`` runs once the
        group is up and every rank agrees on the config (the trainer prepares the run there)."""
        p = config.pipeline
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device, backend = device_and_backend(local_rank, p.backend, config.train.device)
        init_process_group(backend, p.timeout)
        self.topology = place_ranks(p.stages, p.replicas)
        self.watchdog = Watchdog(self.topology, p.timeout).start()
        try:
            check_same_config(config.to_yaml(), self.topology)
            plan = self._plan(config, choose)
            groups = Groups.create(self.topology)
            on_ready(self.topology)
            dtype = DTYPES[config.train.dtype]
            ranges = stage_ranges(self._partition(config, model, device, dtype))
            policy = "horizon" if p.schedule == "auto" else p.schedule
            options = RuntimeOptions(
                config.data.num_microbatches, p.mode, policy, device, dtype,
                compute_options(config.train, device), p.defer_weights, seed=config.train.seed,
                rules=config.rules,
            )  # fmt: skip
            stage = build_stage(model, plan, ranges, groups, config.optim, options, callbacks,
                                config.model, config.train.seed, p.sharding)  # fmt: skip
            dist.barrier()
        except BaseException as error:
            self.watchdog.fail(error)
            raise
        self.config, self.plan, self.runtime = config, plan, stage.runtime
        self.model, self.optimizer = stage.model, stage.optimizer
        self.chunk_size = p.async_window if p.mode == "async" else 1
        self.shard = Shard(self.topology.replica, p.replicas, inputs=self.topology.stage == 0)
        self.is_logger = self.topology.is_last_stage and self.topology.replica == 0
        self.description = (
            f"{self.topology.stages} stages x {self.topology.replicas} replicas, "
            f"{p.mode}, blocks {ranges}"
        )
        self._closed = False

    def _plan(self, config: Config, choose: Callable[[], Plan]) -> Plan:
        """``horizon: auto``: rank 0 measures and chooses (minutes, heartbeating meanwhile),
        the others wait for its choice on a group with a long timeout."""
        if config.horizon.horizon != "auto":
            return choose()
        waiting = dist.new_group(backend="gloo", timeout=timedelta(seconds=SELECTION_TIMEOUT_S))
        chosen = [choose() if self.topology.rank == 0 else None]
        dist.broadcast_object_list(chosen, src=0, group=waiting)
        dist.destroy_process_group(waiting)
        return chosen[0]

    def _partition(self, config: Config, model: BlockModel, device, dtype) -> list[int]:
        """Blocks per stage; rank 0 decides (a timed partition must be the same everywhere)."""
        counts = [None]
        if self.topology.rank == 0:
            data = config.data
            sample = torch.randn(data.batch_size // data.num_microbatches, *model.input_shape)
            counts = [partition(config.pipeline, model, sample, device, dtype)]
        dist.broadcast_object_list(counts, src=0)
        return counts[0]

    def run(self, batches: list[Batch], learning_rates: list[float]) -> list[StepResult]:
        results = self.runtime.run(batches, learning_rates)
        share = self.config.data.batch_size // self.topology.replicas
        return [(loss, correct, share) for loss, correct in results]

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Every replica evaluates its share of each test batch (as it trains on its share);
        the last stages' sums are added up."""
        batch_size = self.config.data.eval_batch_size
        mine = evaluate(self.model, self.runtime.infer, dataset, batch_size, self.shard)
        gathered: list = [None] * self.topology.world_size
        dist.all_gather_object(gathered, mine)
        t = self.topology
        last = [gathered[t.rank_of(t.stages - 1, d)] for d in range(t.replicas)]
        loss, correct = sum(r[0] for r in last), sum(r[1] for r in last)
        return {"loss": loss / len(dataset), "accuracy": correct / len(dataset)}

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
        self.watchdog.wait_until_all_done()
        dist.destroy_process_group()


def make_runner(
    config: Config,
    model: BlockModel,
    choose: Callable[[], Plan],
    prepare: Callable[[bool], None],
    callbacks: Iterable[Callback] = (),
) -> Runner:
    """The runner the config asks for. ``choose()`` gives the plan (a pipeline calls it once its
    group is up; for ``horizon: auto`` on rank 0 only); ``prepare(write)`` readies the run
    directory: called once the processes agree, writing files on one rank only."""
    check_world_size(config)
    callbacks = list(callbacks)
    if config.world_size == 1:
        runner = SingleRunner(config, model, choose(), callbacks)
        prepare(True)
        return runner
    return PipelineRunner(config, model, choose, lambda t: prepare(t.rank == 0), callbacks)
