"""Run a config as a Ray Train job: one ``TorchTrainer`` worker per rank (P x D).

Ray places the workers (one placement-group bundle each, ``ray.placement``), starts them, sets
the rendezvous environment and initialises the process group; each worker then calls the same
``mpc_dist.train.train`` as every other launcher, which derives every rank's (stage, replica)
from the node it landed on. Checkpoints are the run's own DCP checkpoints on the run's storage;
each is reported to Ray with a small pointer checkpoint. After a failure Ray restarts the
worker group (``ray.max_failures``) and the workers resume from the run's latest *complete*
checkpoint: Ray's registered checkpoint can lag the last report by one, so it is only logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import Config, ConfigError, from_dict
from ..console import print_summary
from ..parallel import Topology, pack_pipelines, spanning_pipelines
from ..train import Callback, Checkpointer, prepare_run_dir, read_attempts, train, validate_config
from ..train.metrics import MetricsLogger


def resolve_storage(config: Config, storage: str | None) -> tuple[Config, str]:
    """The config with absolute local paths (Ray workers run in their own working directory)
    and Ray's storage. A storage *path* also holds the run's own files; with a URI (s3://...)
    the run's files stay in ``run.out_dir``, which must then be a shared filesystem."""
    storage = storage or config.ray.storage
    run, data = config.run, config.data
    if storage is None or "://" not in storage:
        storage = str(Path(storage or run.out_dir).expanduser().absolute())
        run = dataclasses.replace(run, out_dir=storage)
    else:
        run = dataclasses.replace(run, out_dir=str(Path(run.out_dir).expanduser().absolute()))
    if data.root is not None:
        data = dataclasses.replace(data, root=str(Path(data.root).expanduser().absolute()))
    return dataclasses.replace(config, run=run, data=data), storage


def planned_map(config: Config, nodes: int, workers_per_node: int) -> str:
    """The (node, stage, replica) of every rank for a cluster of ``nodes`` x ``workers_per_node``
    worker slots, placed as Ray's PACK fills them (node by node) and as the workers derive it."""
    world, P = config.world_size, config.pipeline.stages
    if nodes * workers_per_node < world:
        raise ConfigError(
            f"--nodes {nodes} --workers-per-node {workers_per_node}: {nodes * workers_per_node} "
            f"slots for pipeline.stages x pipeline.replicas = {world} workers"
        )
    names = [f"node{r // workers_per_node}" for r in range(world)]
    local = [r % workers_per_node for r in range(world)]
    topology = Topology(P, config.pipeline.replicas, 0, pack_pipelines(names, local, P))
    lines = [f"{'rank':>5} {'node':>7} {'local':>6} {'stage':>6} {'replica':>8}"]
    for rank in range(world):
        t = dataclasses.replace(topology, rank=rank)
        lines.append(f"{rank:>5} {names[rank]:>7} {local[rank]:>6} {t.stage:>6} {t.replica:>8}")
    for replica, spanned in spanning_pipelines(topology, names).items():
        lines.append(f"warning: replica {replica} spans {' -> '.join(spanned)}")
    return "\n".join(lines)


class ReportToRay(Callback):
    """``ray.train.report`` at every checkpoint (with a pointer checkpoint from rank 0) and every
    evaluation: points every rank reaches together, as Ray's report (a barrier) requires."""

    def after_checkpoint(self, step: int, path: Path) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                Path(folder, "pointer.json").write_text(
                    json.dumps({"step": step, "path": str(path)})
                )
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"step": step, "checkpoint": str(path)}, checkpoint=checkpoint)

    def after_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report({"step": step, **metrics})


def worker(loop_config: dict) -> None:
    """One rank, inside a Ray Train worker (the process group is already up)."""
    import ray.train

    config = from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    # The driver refused a run directory with checkpoints unless asked to resume: any
    # checkpoint here was written by this job's earlier attempt, which Ray restarted.
    latest = Checkpointer(config.run_dir / "checkpoints").latest()
    pointer = ray.train.get_checkpoint()
    notes = {"launcher": "ray", "ray_checkpoint": pointer.path if pointer else None}
    if latest is not None and ray.train.get_context().get_world_rank() == 0:
        print(
            f"mpc-dist: resuming from {latest} (Ray's registered checkpoint: "
            f"{notes['ray_checkpoint']})",
            file=sys.stderr,
        )
    callbacks = [ReportToRay(), *loop_config["callbacks"]]
    resume = loop_config["resume"] or latest is not None
    train(config, resume=resume, callbacks=callbacks, attempt=notes)


def ray_train(
    config: Config,
    address: str | None = None,
    storage: str | None = None,
    max_failures: int | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Train ``config`` on the Ray cluster at ``address`` (default: ``RAY_ADDRESS``, else a local
    instance sized to the config); returns the summary the driver prints."""
    if os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1") != "1":
        raise ConfigError("RAY_TRAIN_V2_ENABLED=0: mpc-dist runs on Ray Train's V2 API; unset it")
    if max_failures is not None:
        ray_config = dataclasses.replace(config.ray, max_failures=max_failures)
        config = dataclasses.replace(config, ray=ray_config)
    validate_config(config)
    config, storage = resolve_storage(config, storage)
    prepare_run_dir(config, resume, write=False)  # refuse to overwrite before anything starts
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "config.yaml").write_text(config.to_yaml())

    import ray

    world = config.world_size
    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(1, int(world * config.ray.cpus_per_worker)))
    use_gpu = wants_gpus(config.ray.use_gpu, ray.cluster_resources().get("GPU", 0), world)
    loop_config = {"config": config.to_dict(), "resume": resume, "callbacks": list(callbacks)}
    started, since = time.perf_counter(), time.time()
    result = _trainer(config, storage, use_gpu, loop_config).fit()
    summary = _summary(config, storage, use_gpu, time.perf_counter() - started, result, since)
    print_summary(f"mpc_dist on Ray: {config.model.name} on {config.data.dataset}", summary)
    return summary


def wants_gpus(use_gpu: bool | None, cluster_gpus: float, workers: int) -> bool:
    """``ray.use_gpu``; unset, one GPU per worker when the cluster has them all now, CPU when it
    has none, and a one-line error in between (an autoscaler still starting GPU nodes would
    otherwise turn a GPU job into a CPU one)."""
    if use_gpu is not None:
        return use_gpu
    if 0 < cluster_gpus < workers:
        raise ConfigError(
            f"ray.use_gpu is unset and the cluster has {cluster_gpus:g} GPU(s) now for "
            f"{workers} workers; set ray.use_gpu=true to wait for GPU nodes, or false for CPU"
        )
    return cluster_gpus >= workers


def _trainer(config: Config, storage: str, use_gpu: bool, loop_config: dict):
    """Ray Train's ``TorchTrainer``: one worker per rank, placed by Ray, restarted on failure."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = config.ray
    return TorchTrainer(
        worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(
            backend="nccl" if use_gpu else "gloo",
            timeout_s=int(config.pipeline.collective_timeout),
        ),
        scaling_config=ScalingConfig(
            num_workers=config.world_size,
            use_gpu=use_gpu,
            placement_strategy=r.placement,
            resources_per_worker={"CPU": r.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
        ),
    )


def _summary(
    config: Config, storage: str, use_gpu: bool, seconds: float, result, since: float
) -> dict:
    attempts = [a for a in read_attempts(config.run_dir) if a["time"] >= since]  # this job's
    p = config.pipeline
    summary = {
        "ray run": config.run.name,
        "ray storage": storage,
        "run directory": str(config.run_dir),
        "workers": f"{config.world_size} ({p.stages} stages x {p.replicas} replicas, "
        f"{'GPU' if use_gpu else 'CPU'}, {config.ray.placement})",
        "restarts": len(attempts) - 1,
        "wall time (s)": seconds,
        "ray checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    evaluations = [
        r for r in MetricsLogger.read(config.run_dir / "metrics.jsonl") if r["kind"] == "eval"
    ]
    if evaluations:
        summary["test loss"] = evaluations[-1]["loss"]
        summary["test accuracy"] = evaluations[-1]["accuracy"]
    return summary


def main(args) -> None:
    """``mpc-dist ray``: the arguments of ``cli.build_parser``."""
    from ..config import load_config

    config = load_config(args.config, args.set)
    if args.dry_run:
        validate_config(config)
        r = config.ray
        print(
            f"Ray Train: {config.world_size} workers, {r.cpus_per_worker:g} CPU each"
            f"{', 1 GPU each' if r.use_gpu else ''}, placement {r.placement}; "
            f"planned on {args.nodes} node(s) x {args.workers_per_node or config.world_size} slots:"
        )
        print(planned_map(config, args.nodes, args.workers_per_node or config.world_size))
        return
    ray_train(config, args.address, args.storage, args.max_failures, args.resume)
