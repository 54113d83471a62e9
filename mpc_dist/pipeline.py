"""Pipeline runs: set up this rank (group, watchdog, stage, optimizer) and drive the runtime."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import Config, ConfigError
from .data import Dataset
from .distributed import (
    Watchdog,
    check_same_config,
    init_process_group,
    launched_world_size,
)
from .models import BlockModel
from .plan import Plan
from .runtime import Groups, PipelineRuntime, needs_head_copies, owned_parameters
from .topology import Topology, device_and_backend, partition, stage_ranges


def _launch_hint(config: Config) -> str:
    n = config.world_size
    return (
        f"run `mpc-dist train --nproc {n} ...`, `torchrun --nproc-per-node {n} launch/train.py "
        f"...`, or `accelerate launch --multi_gpu --num_processes {n} launch/train.py ...` "
        f"(with ACCELERATE_USE_CPU=true on CPU)"
    )


class PipelineRunner:
    """This rank's stage of a P x D pipeline; the training loop drives it like SingleRunner."""

    def __init__(
        self,
        config: Config,
        topology: Topology,
        runtime: PipelineRuntime,
        watchdog: Watchdog,
    ) -> None:
        self.config, self.topology, self.runtime, self.watchdog = (
            config,
            topology,
            runtime,
            watchdog,
        )
        self.model, self.optimizer, self.engine = runtime.model, runtime.optimizer, runtime.engine
        self.replicas = topology.replicas
        self.chunk_size = config.pipeline.async_window if config.pipeline.mode == "async" else 1
        self.is_logger = topology.stage == topology.stages - 1 and topology.replica == 0
        self.description = (
            f"{topology.stages} stages x {topology.replicas} replicas, "
            f"{config.pipeline.mode}, blocks {runtime.ranges}"
        )
        self._closed = False

    @classmethod
    def launch(cls, config: Config, model: BlockModel, plan: Plan, resume: bool) -> PipelineRunner:
        from .trainer import DTYPES, build_optimizer, prepare_run_dir

        world = launched_world_size()
        p = config.pipeline
        if world is None:
            raise ConfigError(
                f"pipeline.stages={p.stages}, pipeline.replicas={p.replicas}: this needs "
                f"{config.world_size} processes; {_launch_hint(config)}"
            )
        if world != config.world_size:
            raise ConfigError(
                f"pipeline.stages x pipeline.replicas = {config.world_size}, but the launcher "
                f"started {world} processes; {_launch_hint(config)}"
            )
        rank = int(os.environ["RANK"])
        device, backend = device_and_backend(int(os.environ.get("LOCAL_RANK", rank)), p.backend)
        init_process_group(backend, p.timeout)
        topology = Topology(p.stages, p.replicas, dist.get_rank())
        watchdog = Watchdog(topology, p.timeout).start()
        try:
            check_same_config(config.to_yaml(), topology)
            groups = Groups.create(topology)
            prepare_run_dir(config, resume, write=topology.rank == 0)
            dtype = DTYPES[config.train.dtype]
            counts = [None]
            if topology.rank == 0:  # a timed partition must be the same on every rank
                sample = torch.randn(
                    config.data.batch_size // config.data.num_microbatches, *model.input_shape
                )
                counts = [partition(p, model, sample)]
            dist.broadcast_object_list(counts, src=0)
            ranges = stage_ranges(counts[0])
            head_copy = needs_head_copies(model.head_mode, plan)
            part = model.split(*ranges[topology.stage], head_copy).to(device, dtype)
            optimizer = build_optimizer(config.optim, owned_parameters(part))
            runtime = PipelineRuntime(
                part, plan, ranges, topology, groups, optimizer,
                model.state_shapes, config.data.num_microbatches, p.mode,
                p.schedule if p.schedule != "auto" else "horizon", device, dtype,
                config.optim.grad_clip,
            )  # fmt: skip
            dist.barrier()
        except BaseException as error:
            watchdog.fail(error)
            raise
        return cls(config, topology, runtime, watchdog)

    # ------------------------------------------------------------------ the runner protocol

    def run(self, batches, learning_rates: list[float]) -> list[tuple[float, int, int]]:
        d, share = self.topology.replica, self.config.data.batch_size // self.replicas
        mine = [
            (x[d * share : (d + 1) * share], y[d * share : (d + 1) * share]) for x, y in batches
        ]
        results = self.runtime.run(mine, learning_rates)
        return [(loss, correct, share) for loss, correct in results]

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        from .trainer import _eval_batches

        loss, correct = self.runtime.evaluate(
            _eval_batches(dataset, self.config.data.eval_batch_size)
        )
        gathered: list = [None] * self.topology.world_size
        dist.all_gather_object(gathered, (loss, correct))
        loss, correct = gathered[self.topology.rank_of(self.topology.stages - 1, 0)]
        return {"loss": loss / len(dataset), "accuracy": correct / len(dataset)}

    def stage_report(self) -> dict[str, list[float]]:
        """Per-stage busy and idle seconds and peak activation MiB (replica 0), on every rank."""
        times, memory = self.runtime.times, self.engine.memory
        mine = (times.busy, max(0.0, times.wall - times.busy), memory.peak_bytes / 2**20)
        gathered: list = [None] * self.topology.world_size
        dist.all_gather_object(gathered, mine)
        rows = gathered[: self.topology.stages]
        return {
            "stage_busy_s": [round(r[0], 3) for r in rows],
            "stage_idle_s": [round(r[1], 3) for r in rows],
            "stage_peak_activation_mib": [round(r[2], 3) for r in rows],
        }

    def fail(self, error: BaseException) -> None:
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
