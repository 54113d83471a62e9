"""``mpc-dist doctor``: check a node or a job before a long run.

Every rank (one process when run plainly; every process under torchrun or another launcher that
sets RANK and WORLD_SIZE) checks its own node: torch, CUDA, cuDNN and NCCL versions; the device
it would train on and the GPUs visible against the ranks on its node; ``/dev/shm``; NCCL's
environment variables; free memory against the ``--dry-run`` estimate of the config's largest
stage. Then the job together: its size against the config, whether ``run.out_dir`` is one
filesystem every rank sees (rank 0 writes a token, every rank reads it after a barrier), and on
GPUs one NCCL all-reduce over every rank. Rank 0 prints one table; each failure is one line
naming the fix, and the exit code is 1 when something blocks the run.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from .bootstrap import ranks_text, shared_directory_misses
from .dry_run import stage_map
from .validate import validate_config

GiB = 2**30
SHM_BLOCKING = 256 * 2**20  # below this, NCCL's shared-memory transport fails between GPU ranks
SHM_SMALL = GiB  # below this, Ray's object store and data loaders spill or fail
MEMORY_HEADROOM = 1.25  # the estimate leaves out framework buffers and temporaries
TORCH_FSDP_FLOOR = (2, 8)  # FSDP2's set_force_sum_reduction_for_comms (pipeline.sharding: fsdp)
SLOW_NCCL = {
    "NCCL_P2P_DISABLE": "stage-to-stage messages avoid NVLink/PCIe peer-to-peer",
    "NCCL_SHM_DISABLE": "ranks on one node talk through the network stack",
    "NCCL_IB_DISABLE": "nodes talk over TCP sockets instead of InfiniBand",
}


@dataclass(frozen=True)
class Check:
    name: str
    result: str
    status: str = "ok"  # ok | warn | fail (fail: the run cannot start or would break)
    fix: str = ""


@dataclass(frozen=True)
class Place:
    """Where this process is: its rank, the job's size, its node and the ranks there."""

    rank: int
    world: int
    local_rank: int
    node: str
    ranks_on_node: int
    nodes: int


# ----------------------------------------------------------------------------- checks of a node


def versions(config: Config) -> list[Check]:
    """torch, CUDA, cuDNN and NCCL as this process has them."""
    cuda = torch.version.cuda or "none (a CPU build)"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    if nccl is None and dist.is_nccl_available():
        try:  # the library's version, without a GPU
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError):
            nccl = "unknown"
    found = Check(
        "torch / CUDA / cuDNN / NCCL",
        f"{torch.__version__} / {cuda} / {torch.backends.cudnn.version()} / {nccl or 'not built'}",
    )
    checks = [found]
    release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if config.pipeline.sharding == "fsdp" and release < TORCH_FSDP_FLOOR:
        floor = ".".join(map(str, TORCH_FSDP_FLOOR))
        checks.append(
            Check(
                "torch for FSDP",
                torch.__version__,
                "fail",
                f"pipeline.sharding=fsdp needs torch >= {floor}; upgrade torch",
            )
        )
    return checks


def gpus_present() -> int:
    """GPUs the NVIDIA driver exposes on this node (its device files), whatever torch sees."""
    return sum(1 for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit())


def device_check(config: Config, place: Place) -> tuple[torch.device, list[Check]]:
    """The device this rank would train on, and whether the node can give every rank its own."""
    wanted, backend = config.train.device, config.pipeline.backend
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    where = f"{place.ranks_on_node} rank(s) on node {place.node}"
    if wanted == "cpu" or (wanted == "auto" and visible == 0 and not gpus_present()):
        result = f"cpu, {where}" + (", no GPU" if not visible else ", GPUs left unused")
        return torch.device("cpu"), [Check("device", result)]
    if visible == 0:
        if wanted == "cuda":
            return torch.device("cpu"), [
                Check(
                    "device",
                    f"train.device=cuda: no CUDA device is visible on node {place.node}",
                    "fail",
                    "run on a GPU node, or set train.device=auto (the CPU here)",
                )
            ]
        return torch.device("cpu"), [
            Check(
                "device",
                f"the driver shows {gpus_present()} GPU(s) but torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}) cannot use them",
                "fail",
                "install the torch wheel built for this driver's CUDA (nvidia-smi shows it), "
                "or set train.device=cpu",
            )
        ]
    if place.ranks_on_node > visible:
        return torch.device("cpu"), [
            Check(
                "device",
                f"{where} but {visible} GPU(s) visible: two ranks would share a GPU, "
                f"which NCCL refuses",
                "fail",
                f"start at most {visible} ranks per node (more nodes), or set train.device=cpu",
            )
        ]
    device = torch.device("cuda", place.local_rank)
    checks = [
        Check("device", f"{device} of {visible} ({torch.cuda.get_device_name(device)}), {where}")
    ]
    if backend == "gloo":
        checks.append(
            Check(
                "backend",
                "pipeline.backend=gloo with CUDA tensors",
                "fail",
                "gloo cannot send CUDA tensors: use pipeline.backend=auto (NCCL)",
            )
        )
    return device, checks


def shm_check(place: Place, device: torch.device) -> Check:
    """``/dev/shm``: NCCL's transport between ranks on one node, Ray's object store."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return Check("/dev/shm", "missing", "warn", "mount a tmpfs at /dev/shm")
    size = stats.f_frsize * stats.f_blocks
    result = f"{size / GiB:.2f} GiB"
    fix = (
        "give the container a larger /dev/shm: docker run --shm-size=16g; Kubernetes: an "
        "emptyDir with medium: Memory at /dev/shm (cluster/kuberay-rayjob.yaml)"
    )
    if device.type == "cuda" and place.ranks_on_node > 1 and size < SHM_BLOCKING:
        return Check("/dev/shm", result + ": NCCL's shared-memory transport fails", "fail", fix)
    if size < SHM_SMALL:
        return Check("/dev/shm", result + ": small for Ray's object store", "warn", fix)
    return Check("/dev/shm", result)


def nccl_environment(place: Place, device: torch.device) -> Check:
    """NCCL's settings as the launcher passed them (and any that make it slow)."""
    names = sorted(
        k
        for k in os.environ
        if k.startswith(("NCCL_", "TORCH_NCCL_")) or k == "CUDA_VISIBLE_DEVICES"
    )
    listed = ", ".join(f"{k}={os.environ[k]}" for k in names) or "none set (NCCL's defaults)"
    if device.type != "cuda":
        return Check("NCCL variables", listed + " (unused: this rank has no GPU)")
    slow = [k for k in SLOW_NCCL if os.environ.get(k) == "1"]
    slow = [k for k in slow if k != "NCCL_IB_DISABLE" or place.nodes > 1]
    if slow:
        why = "; ".join(f"{k}=1: {SLOW_NCCL[k]}" for k in slow)
        return Check("NCCL variables", listed, "warn", f"{why}: unset unless a test needs it")
    return Check("NCCL variables", listed)


def memory_check(config: Config, place: Place, device: torch.device) -> Check:
    """Free memory against the dry-run estimate of the largest stage (any rank may get it)."""
    rows, _, _ = stage_map(config)
    need = max(r["memory_bytes"] for r in rows)
    fix = (
        "more stages (pipeline.stages), train.activation_checkpointing=blocks, "
        "pipeline.sharding=fsdp, a smaller horizon or microbatch; see --dry-run"
    )
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where, need_here = f"{device}: {free / GiB:.1f} of {total / GiB:.1f} GiB free", need
    else:  # the node's ranks share its memory
        free = _available_memory()
        where = f"node {place.node}: {free / GiB:.1f} GiB available"
        need_here = need * place.ranks_on_node
    result = f"{where}; estimate {need_here / GiB:.2f} GiB"
    if free < need_here:
        return Check("memory", result, "fail", fix)
    if free < MEMORY_HEADROOM * need_here:
        return Check("memory", result + " (little headroom)", "warn", fix)
    return Check("memory", result)


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ----------------------------------------------------------------------------- the job together


def _join() -> Place:
    """This process's place: alone, or in the launcher's job (a gloo group for the doctor)."""
    node = socket.gethostname()
    if "WORLD_SIZE" not in os.environ:
        return Place(0, 1, 0, node, 1, 1)
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return Place(rank, world, local_rank, node, nodes.count(node), len(set(nodes)))


def job_checks(config: Config, place: Place, device: torch.device) -> list[Check]:
    """Collective: the job's size, the shared run directory, NCCL across every rank."""
    checks = []
    if place.world != config.world_size:
        checks.append(
            Check(
                "job",
                f"{place.world} ranks, the config {config.pipeline.stages} x "
                f"{config.pipeline.replicas}",
                "fail",
                f"start pipeline.stages x pipeline.replicas = {config.world_size} ranks",
            )
        )
    out_dir = Path(config.run.out_dir).absolute()
    misses = shared_directory_misses(out_dir)
    if misses:
        checks.append(
            Check(
                "run directory",
                f"{out_dir}: rank(s) {ranks_text(misses)} cannot read rank 0's file",
                "fail",
                "put run.out_dir on a filesystem every node mounts (NFS, Lustre, EFS)",
            )
        )
    else:
        checks.append(Check("run directory", f"{out_dir}: shared by all {place.world} ranks"))
    on_gpus: list = [None] * place.world
    dist.all_gather_object(on_gpus, device.type == "cuda")
    if all(on_gpus):
        checks.append(_nccl_all_reduce(device, place))
    return checks


def writable_check(directory: Path) -> Check:
    """One process: can it write the run's files?"""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".mpc-dist-writable-{secrets.token_hex(4)}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        return Check(
            "run directory",
            f"{directory}: {error.strerror}",
            "fail",
            "set run.out_dir to a directory this user can write",
        )
    return Check("run directory", f"{directory}: writable")


def _nccl_all_reduce(device: torch.device, place: Place) -> Check:
    """One all-reduce over every rank's GPU: NCCL finds its way between the nodes."""
    try:
        group = dist.new_group(backend="nccl", timeout=timedelta(seconds=120))
        ones = torch.ones(1, device=device)
        dist.all_reduce(ones, group=group)
        got = int(ones.item())
        dist.destroy_process_group(group)
    except Exception as error:  # any failure here is the finding
        return Check(
            "NCCL all-reduce",
            f"{type(error).__name__}: {str(error)[:120]}",
            "fail",
            "rerun with NCCL_DEBUG=INFO; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA to the "
            "interfaces between the nodes; open the ports between them",
        )
    status = "ok" if got == place.world else "fail"
    return Check("NCCL all-reduce", f"{got} of {place.world} ranks", status)


# ----------------------------------------------------------------------------- the report


def node_checks(config: Config, place: Place) -> tuple[torch.device, list[Check]]:
    """Everything this rank checks alone."""
    checks = [
        Check(
            "node",
            f"{place.node}: {place.ranks_on_node} of {place.world} rank(s), {place.nodes} node(s)",
        )
    ]
    checks += versions(config)
    try:
        validate_config(config)
    except ConfigError as error:
        return torch.device("cpu"), [*checks, Check("config", str(error), "fail", "fix the config")]
    device, found = device_check(config, place)
    checks += found
    checks.append(shm_check(place, device))
    checks.append(nccl_environment(place, device))
    if not any(c.status == "fail" for c in found) and (
        device.type == "cuda" or place.local_rank == 0
    ):
        checks.append(memory_check(config, place, device))  # the CPU's: once per node
    return device, checks


def run_doctor(config: Config) -> int:
    """Check this node (every rank under a launcher); rank 0 prints the table and one line per
    failure. Returns the exit code, the same on every rank: 1 if something blocks the run."""
    place = _join()
    if place.world == 1 and "WORLD_SIZE" not in os.environ:
        # run plainly: the whole job on this node, as `mpc-dist train --nproc N` would start it
        place = Place(0, 1, 0, place.node, config.world_size, 1)
    device, checks = node_checks(config, place)
    if dist.is_initialized():
        checks += job_checks(config, place, device)
        everyone: list = [None] * place.world
        dist.all_gather_object(everyone, checks)
    else:
        everyone = [[*checks, writable_check(Path(config.run.out_dir).absolute())]]
    failed = any(c.status == "fail" for rank_checks in everyone for c in rank_checks)
    if place.rank == 0:
        report(config, everyone)
    return 1 if failed else 0


def report(config: Config, everyone: list[list[Check]]) -> None:
    """One table of every rank's checks (identical results on several ranks: one row), then
    one line per failure on stderr."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"mpc-dist doctor: {config.run.name}, {config.pipeline.stages} stages x "
        f"{config.pipeline.replicas} replicas, device {config.train.device}"
    )
    for column in ("check", "ranks", "result", "status"):
        table.add_column(column)
    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    failures = []
    for name, result, status, fix, ranks in _merged(everyone):
        label = "all" if len(ranks) == len(everyone) else ranks_text(ranks)
        table.add_row(
            name,
            label,
            result + (f" ({fix})" if fix and status == "warn" else ""),
            f"[{style[status]}]{status}[/]",
        )
        if status == "fail":
            who = "every rank" if label == "all" else f"rank {label}"
            failures.append(f"mpc-dist doctor: FAIL {name} ({who}): {result}; {fix}")
    Console(width=160).print(table)
    for line in failures:
        print(line, file=sys.stderr)
    if not failures:
        print("mpc-dist doctor: nothing blocks this run", file=sys.stderr)


def _merged(everyone: list[list[Check]]) -> list[tuple[str, str, str, str, list[int]]]:
    """Rows of (check, result, status, fix, ranks), in the order rank 0 made them."""
    rows: dict[tuple[str, str, str, str], list[int]] = {}
    for rank, checks in enumerate(everyone):
        for c in checks:
            rows.setdefault((c.name, c.result, c.status, c.fix), []).append(rank)
    order = list(dict.fromkeys(c.name for checks in everyone for c in checks))
    ordered = sorted(rows.items(), key=lambda item: order.index(item[0][0]))
    return [(*key, ranks) for key, ranks in ordered]


def spawned(nproc: int, config_path: str | None, overrides: list[str]) -> int:
    """``mpc-dist doctor --nproc N``: the doctor in N local ranks under torchrun. The ranks'
    table comes through; of the rest only the doctor's own lines (not torchrun's report of a
    rank that exited 1)."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "mpc_dist.cli",
        "doctor",
    ]
    if config_path:
        command += ["--config", config_path]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True)
    ours = [line for line in done.stderr.splitlines() if line.startswith("mpc-dist")]
    print("\n".join(ours) if ours else done.stderr[-3000:], file=sys.stderr)
    return 1 if done.returncode else 0
