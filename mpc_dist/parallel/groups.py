"""Processes, devices and process groups: joining the launcher's job, the pipeline and
data-parallel groups of a rank, and the collectives the step needs over them."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..config import ConfigError
from ..devices import resolve_device
from .topology import Topology, pack_pipelines, spanning_pipelines

BUCKET_BYTES = 25 * 2**20


def launched_world_size() -> int | None:
    """WORLD_SIZE as torchrun / accelerate / deepspeed / Ray set it; None when run plainly."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value is not None else None


def device_and_backend(
    local_rank: int, backend: str = "auto", device: str = "auto"
) -> tuple[torch.device, str]:
    """This rank's device and process-group backend: ``device`` auto means CUDA when a GPU is
    present (the local rank's GPU), else CPU; ``backend`` auto means NCCL on CUDA, gloo on CPU."""
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:  # two ranks on one GPU: NCCL fails with "Duplicate GPU"
            raise ConfigError(
                f"train.device={device}: local rank {local_rank} has no GPU of its own (this "
                f"node shows {count}); start at most {count} rank(s) per node, or set "
                f"train.device=cpu"
            )
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if backend == "auto":
        backend = "nccl" if chosen.type == "cuda" else "gloo"
    return chosen, backend


def init_process_group(
    backend: str, timeout_s: float, device: torch.device | None = None
) -> tuple[int, int, int]:
    """Join the job's default group from the launcher's environment (with the collectives'
    timeout, and under NCCL bound to this rank's GPU); returns rank, world, local rank."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _attempt_store(rank, world, timeout)
        bound = device if device is not None and device.type == "cuda" else None
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timeout, store=store, device_id=bound
        )
    return rank, world, local_rank


def shares_agent_store_across_restarts() -> bool:
    """Under torchrun's elastic agent (also behind ``accelerate launch``) the workers use the
    agent's store, and it outlives a restart: a restarted attempt can read the previous one's
    keys (gloo's addresses, NCCL's unique id) and fail to connect or hang (pytorch#135712)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    return restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store | None:
    """The agent's store with a key prefix of its own for every attempt, where one agent counts
    the restarts (one node); None (torch's own rendezvous) elsewhere. Several agents count
    restarts each on their own, so there only TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh
    store per attempt) helps; ``train.bootstrap`` says so."""
    if not shares_agent_store_across_restarts() or int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    return dist.PrefixStore(f"mpc_dist/attempt_{attempt}", store)


def job_token() -> str:
    """A name this job's ranks agree on (rank 0's, broadcast): keys under it in a store that
    outlives the job (an elastic agent's) are never read by a later attempt."""
    token = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    return token[0]


def place_ranks(stages: int, replicas: int) -> Topology:
    """This rank's place, derived from where the launcher actually put every rank (node, local
    rank): each pipeline on as few nodes as possible. Every rank says once where it is; a
    pipeline that spans nodes is reported (collective)."""
    here = (socket.gethostname(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    placements: list = [None] * dist.get_world_size()
    dist.all_gather_object(placements, here)
    nodes = [node for node, _ in placements]
    order = pack_pipelines(nodes, [local for _, local in placements], stages)
    topology = Topology(stages, replicas, dist.get_rank(), order)
    _say(f"mpc-dist: {topology.describe(topology.rank)} on node {here[0]}")
    spans = spanning_pipelines(topology, nodes)
    if spans and topology.rank == 0:
        listed = "; ".join(f"replica {d}: {' -> '.join(n)}" for d, n in spans.items())
        _say(
            f"mpc-dist: warning: {len(spans)} pipeline(s) span nodes ({listed}); their "
            f"stage-to-stage messages cross the network. Give every node a multiple of "
            f"pipeline.stages={stages} workers"
        )
    return topology


def _say(line: str) -> None:
    """One line to stderr in one write, so that lines of several ranks do not interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def check_same_config(config_yaml: str, topology: Topology) -> None:
    """Ranks started with different configs would train different things: refuse at start-up."""
    digest = hashlib.sha256(config_yaml.encode()).hexdigest()[:12]
    digests: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        names = ", ".join(topology.describe(r) for r in odd)
        raise ValueError(
            f"pipeline: {names} started with a different config than rank 0 "
            f"({digests[odd[0]]} vs {digests[0]}); launch every rank with the same --config/--set"
        )


@dataclass
class Groups:
    """This rank's place and its process groups (None where a group would hold one rank).

    Point-to-point messages travel on one group per direction: activations (up the pipeline)
    and cotangents (down) between the same neighbours then use different communicators, so
    under NCCL, where a send completes only with its matching receive and each communicator
    runs a rank's operations in order, the two directions cannot block each other
    (``schedule.check_rendezvous`` proves every generated schedule completes this way).
    """

    topology: Topology
    pipeline: dist.ProcessGroup | None
    data_parallel: dist.ProcessGroup | None
    messages: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)  # F: up, B: down

    @staticmethod
    def create(
        topology: Topology,
        message_timeout_s: float | None = None,
        collective_timeout_s: float | None = None,
    ) -> Groups:
        """Every group with its timeout: the message groups ``message_timeout_s`` (a message
        that does not come is a failure: ``pipeline.timeout``), the pipeline's and the
        data-parallel collectives ``collective_timeout_s`` (None: torch's default)."""
        timeouts = {
            name: timedelta(seconds=value) if value is not None else None
            for name, value in (
                ("F", message_timeout_s),
                ("B", message_timeout_s),
                ("pipeline", collective_timeout_s),
                ("data_parallel", collective_timeout_s),
            )
        }
        # new_group is collective over the world: every rank creates every group, in order.
        mine: dict[str, dist.ProcessGroup | None] = {}
        for d in range(topology.replicas):
            for name in ("pipeline", "F", "B"):
                group = dist.new_group(topology.pipeline_ranks(d), timeout=timeouts[name])
                if d == topology.replica and topology.stages > 1:
                    mine[name] = group
        for k in range(topology.stages):
            ranks = topology.data_parallel_ranks(k)
            group = dist.new_group(ranks, timeout=timeouts["data_parallel"])
            if k == topology.stage and topology.replicas > 1:
                mine["data_parallel"] = group
        messages = {kind: mine.get(kind) for kind in ("F", "B")}
        return Groups(topology, mine.get("pipeline"), mine.get("data_parallel"), messages)

    def set_message_timeout(self, seconds: float) -> None:
        """Change the message groups' timeout from now on (torchtitan's first-step timeout:
        steps that compile wait longer for messages than later ones)."""
        set_timeout = getattr(dist, "set_timeout", None)  # public from torch 2.10
        if set_timeout is None:
            set_timeout = dist.distributed_c10d._set_pg_timeout
        for group in self.messages.values():
            if group is not None:
                set_timeout(timedelta(seconds=seconds), group)

    def warm_up(self, device: torch.device) -> None:
        """Open every point-to-point channel before the first timed step: NCCL creates a pair's
        communicator at its first message, blocking the host. Every rank walks the same list of
        (channel, lower stage, upper stage) pairs in one global order, so the blocking first
        messages pair up and cannot wait on each other."""
        t = self.topology
        if t.stages == 1:
            return
        pairs = [(k, k + 1) for k in range(t.stages - 1)]
        pairs += [(0, t.stages - 1)] if t.stages > 2 else []  # a top-down rule's error
        token = torch.zeros(1, device=device)
        for channel in ("F", "B"):
            group = self.messages[channel]
            for low, high in pairs:
                if t.stage not in (low, high):
                    continue
                if t.stage == low:
                    dist.send(token, dst=t.rank_of(high), group=group)
                else:
                    dist.recv(token, src=t.rank_of(low), group=group)


def all_reduce_gradients(params: list[torch.nn.Parameter], group: dist.ProcessGroup) -> None:
    """Sum the gradients over ``group`` in flat buckets of about ``BUCKET_BYTES``."""
    bucket: list[torch.Tensor] = []
    size = 0
    grads = [p.grad for p in params if p.grad is not None]
    for grad in [*grads, None]:
        if grad is not None:
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
        if bucket and (grad is None or size >= BUCKET_BYTES):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                g.copy_(reduced)
            bucket, size = [], 0


def broadcast_parameters(params: list[torch.nn.Parameter], src: int, group) -> None:
    """Copy the values of ``params`` on rank ``src`` to every rank of ``group``."""
    flat = _flatten_dense_tensors([p.data for p in params])
    dist.broadcast(flat, src=src, group=group)
    for p, value in zip(params, _unflatten_dense_tensors(flat, params), strict=True):
        p.data.copy_(value)
