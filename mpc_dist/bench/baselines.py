"""Third-party pipeline-parallel baselines for benchmarking.

Each function runs ONE pipeline-parallel training configuration of another system inside an
already-initialized ``torch.distributed`` default process group whose world size is the number of
pipeline stages ``P`` (rank ``r`` holds stage ``r``); all ranks call the same function:

* :func:`run_torch_pipelining`: ``torch.distributed.pipelining`` with ``Schedule1F1B`` or
  ``ScheduleGPipe`` (a stage per rank), ``ScheduleInterleaved1F1B`` or
  ``ScheduleInterleavedZeroBubble`` (two stages per rank, looped: r and r + P), or
  ``ScheduleZBVZeroBubble`` or ``ScheduleDualPipeV`` (two stages per rank, in a V: r and 2P-1-r).
* :func:`run_deepspeed_pipeline`: ``deepspeed.pipe.PipelineModule`` + ``engine.train_batch``
  (DeepSpeed's ``TrainSchedule``, a 1F1B schedule).

Every rank builds only the blocks of its own stage(s) with ``make_block(i)``. The data is one fixed
random batch (inputs and regression targets, same on every rank: see :func:`make_batch`), the
loss is the mean squared error, averaged over microbatches, and the optimizer is plain SGD.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "BaselineResult",
    "DEFAULT_LR",
    "TORCH_SCHEDULES",
    "make_batch",
    "mse_loss",
    "run_deepspeed_pipeline",
    "run_torch_pipelining",
    "stage_block_ranges",
    "stages_per_rank",
]

LOOPED = ("ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble")
V_SHAPED = ("ScheduleZBVZeroBubble", "ScheduleDualPipeV")
TORCH_SCHEDULES = ("Schedule1F1B", "ScheduleGPipe", *LOOPED, *V_SHAPED)


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule in LOOPED or schedule in V_SHAPED else 1


def stage_ids(schedule: str, world: int, rank: int) -> list[int]:
    """The global stage indices rank ``rank`` holds, in its own order."""
    if schedule in V_SHAPED:
        return [rank, 2 * world - 1 - rank]
    if schedule in LOOPED:
        return [rank, rank + world]
    return [rank]


# Tiny, so that benchmark runs of many steps stay finite whatever the blocks are.
DEFAULT_LR = 1e-4
DATA_SEED = 1234


@dataclass
class BaselineResult:
    # Wall seconds of each optimizer step (minibatch), measured on this rank, warm-up excluded.
    step_times: list[float] = field(default_factory=list)
    # (start, end) perf_counter times of each measured step, to cut timelines into steps.
    windows: list[tuple[float, float]] = field(default_factory=list)
    # Loss (mean over microbatches) per measured step on the last stage; empty elsewhere.
    losses: list[float] = field(default_factory=list)


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Default loss: mean squared error against the fixed random target."""
    return nn.functional.mse_loss(output, target)


def make_batch(
    microbatch_shape: tuple[int, ...],
    num_microbatches: int,
    dtype: torch.dtype = torch.float32,
    seed: int = DATA_SEED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed minibatch ``(inputs, targets)`` every baseline trains on, same on every rank.

    Both have shape ``(num_microbatches * microbatch_shape[0], *microbatch_shape[1:])``;
    microbatch ``j`` is rows ``j * mb : (j + 1) * mb``.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (num_microbatches * microbatch_shape[0], *microbatch_shape[1:])
    inputs = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    targets = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return inputs, targets


def stage_block_ranges(schedule: str, num_blocks: int, world: int, rank: int) -> list[range]:
    """Global block indices of the stage(s) rank ``rank`` holds (see ``stage_ids``).

    1F1B/GPipe/DeepSpeed: one contiguous range (stage ``rank`` of ``world``); the others: two
    ranges of ``2 * world`` stages.
    """
    num_stages = world * stages_per_rank(schedule)
    if num_blocks % num_stages:
        raise ValueError(
            f"{schedule}: num_blocks={num_blocks} must be divisible by the number of pipeline "
            f"stages {num_stages} (world size {world}"
            + (", two stages per rank)" if num_stages != world else ")")
        )
    per_stage = num_blocks // num_stages
    return [range(s * per_stage, (s + 1) * per_stage) for s in stage_ids(schedule, world, rank)]


def _device() -> torch.device:
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype_of(modules: list[nn.Module]) -> torch.dtype:
    for module in modules:
        for tensor in module.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.get_default_dtype()


def _check_common(microbatch_shape, num_microbatches, steps, warmup) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize the torch.distributed default process group first")
    if len(microbatch_shape) < 1 or microbatch_shape[0] < 1:
        raise ValueError(f"bad microbatch_shape {microbatch_shape!r}")
    if num_microbatches < 1 or steps < 0 or warmup < 0:
        raise ValueError(
            f"need num_microbatches >= 1, steps >= 0, warmup >= 0; got "
            f"{num_microbatches}, {steps}, {warmup}"
        )


def _context(around_step: Callable[[], ContextManager] | None) -> ContextManager:
    return around_step() if around_step is not None else contextlib.nullcontext()


def run_torch_pipelining(
    schedule: str,
    make_block: Callable[[int], nn.Module],
    num_blocks: int,
    microbatch_shape: tuple[int, ...],
    num_microbatches: int,
    steps: int,
    warmup: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mse_loss,
    around_step: Callable[[], ContextManager] | None = None,
    *,
    lr: float = DEFAULT_LR,
    activation_dtype: torch.dtype | None = None,
) -> BaselineResult:
    """Train with a ``torch.distributed.pipelining`` schedule for ``warmup + steps`` steps.

    Rank ``r`` of ``P`` holds stage ``r`` of ``P`` (1F1B, GPipe), stages ``r`` and ``r + P``
    of ``2P`` (interleaved) or ``r`` and ``2P - 1 - r`` (V-shaped: rank 0 holds the first AND
    the last stage). Each step: ``barrier``; then, timed and inside ``around_step()``:
    ``schedule.step``, SGD step, ``zero_grad``. Gradients are averaged over microbatches
    (``scale_grads=True``), so one step equals one full-batch step of ``loss_fn`` when
    ``loss_fn`` is a mean. ``activation_dtype``: of the inputs and of what stages hand each
    other (default: the parameters'), e.g. bfloat16 for blocks that compute under autocast.
    """
    from torch.distributed.pipelining import schedules

    if schedule not in TORCH_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {TORCH_SCHEDULES}")
    _check_common(microbatch_shape, num_microbatches, steps, warmup)
    num_stages = dist.get_world_size() * stages_per_rank(schedule)
    if schedule == "Schedule1F1B" and num_microbatches < num_stages:
        raise ValueError(
            f"Schedule1F1B needs num_microbatches >= stages ({num_stages}); got {num_microbatches}"
        )
    device = _device()
    modules, stages, dtype = _torch_stages(
        schedule, make_block, num_blocks, microbatch_shape, device, activation_dtype
    )
    schedule_cls = getattr(schedules, schedule)
    pipe = schedule_cls(
        stages if len(stages) > 1 else stages[0], n_microbatches=num_microbatches, loss_fn=loss_fn
    )
    is_first, is_last = any(s.is_first for s in stages), any(s.is_last for s in stages)
    params = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr) if params else None
    inputs, targets = make_batch(microbatch_shape, num_microbatches, dtype)
    args = (inputs.to(device),) if is_first else ()
    kwargs: dict[str, Any] = {"target": targets.to(device)} if is_last else {}

    def step() -> float | None:
        mb_losses: list[torch.Tensor] = []
        pipe.step(*args, losses=mb_losses, return_outputs=False, **kwargs)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(torch.stack([x.detach() for x in mb_losses]).mean()) if is_last else None

    return _timed_steps(step, steps, warmup, around_step, device)


def _torch_stages(
    schedule: str,
    make_block: Callable[[int], nn.Module],
    num_blocks: int,
    microbatch_shape: tuple[int, ...],
    device: torch.device,
    activation_dtype: torch.dtype | None = None,
) -> tuple[list[nn.Module], list, torch.dtype]:
    """This rank's modules under ``schedule``, a ``PipelineStage`` for each, and the dtype of
    the activations they take and hand on."""
    from torch.distributed.pipelining import PipelineStage

    world, rank = dist.get_world_size(), dist.get_rank()
    num_stages = world * stages_per_rank(schedule)
    ranges = stage_block_ranges(schedule, num_blocks, world, rank)
    modules = [nn.Sequential(*[make_block(i) for i in blocks]).to(device) for blocks in ranges]
    dtype = activation_dtype or _dtype_of(modules)

    def example(requires_grad: bool) -> torch.Tensor:
        tensor = torch.empty(microbatch_shape, dtype=dtype, device=device)
        return tensor.requires_grad_(requires_grad)

    # Static metadata (no shape inference at the first step). In torch 2.14 the examples'
    # requires_grad decides which activation gradients are sent: received activations and all
    # outputs need it, the root input (stage 0) does not.
    stages = [
        PipelineStage(
            module,
            stage_id,
            num_stages,
            device,
            input_args=example(stage_id > 0),
            output_args=example(True),
        )
        for module, stage_id in zip(modules, stage_ids(schedule, world, rank), strict=True)
    ]
    return modules, stages, dtype


def _timed_steps(
    step: Callable[[], float | None],
    steps: int,
    warmup: int,
    around_step: Callable[[], ContextManager] | None,
    device: torch.device,
) -> BaselineResult:
    """Call ``step`` (inside ``around_step()``) ``warmup + steps`` times, each from a barrier
    with the device idle (``timing.StepTimer``: CUDA events on a GPU); record the last ``steps``:
    time, window, and the loss where ``step`` returns one."""
    from .timing import StepTimer

    result, timer = BaselineResult(), StepTimer(device)
    for number in range(warmup + steps):
        with timer.step(), _context(around_step):
            loss = step()
        if number >= warmup:
            result.windows.append(timer.windows[-1])
            if loss is not None:
                result.losses.append(loss)
    result.step_times = timer.durations(skip=warmup)
    dist.barrier()
    return result


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Swallow what DeepSpeed prints on stdout; replay it on stderr if something fails."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


def _import_deepspeed():
    """Import DeepSpeed with its logger at WARNING: its CUDA accelerator under NCCL, its CPU
    accelerator otherwise (unless ``DS_ACCELERATOR`` says; ``_deepspeed_module`` checks it)."""
    cpu = dist.get_backend() != "nccl"
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cpu else "cuda")
    # On CPU machines with a CUDA toolkit dir, importing torch.utils.cpp_extension (DeepSpeed's
    # op builders do) warns "No CUDA runtime is found" once per process.
    quiet_ext = logging.ERROR if cpu else logging.NOTSET
    with _silenced(), _logger_level("torch.utils.cpp_extension", quiet_ext):
        import deepspeed
        import deepspeed.pipe  # noqa: F401
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


@contextlib.contextmanager
def _without_shm_comm_op(skip: bool) -> Iterator[None]:
    """Keep DeepSpeed's TorchBackend from JIT-compiling its shared-memory comm op.

    DeepSpeed builds ``deepspeed_shm_comm`` (a C++ op, ~40 s with a cold ``TORCH_EXTENSIONS_DIR``,
    needs a compiler) when its comm backend is created, but uses it only in
    ``inference_all_reduce`` (tensor-parallel inference), never in pipeline training. Without
    it DeepSpeed falls back to ``torch.distributed``, which is what it uses for training anyway.
    """
    # importlib, not ``import deepspeed.comm.torch as m``: ``deepspeed.comm`` re-exports the name
    # ``torch`` (the torch package), which that attribute-based import would bind instead.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    original = getattr(ds_torch_comm, "build_shm_op", None)
    if not skip or original is None:
        yield
        return
    ds_torch_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch_comm.build_shm_op = original


class _BuildBlock(nn.Module):
    """``LayerSpec`` needs an ``nn.Module`` subclass; this one builds ``make_block(index)``.

    ``__new__`` returns the user's module itself (so ``__init__`` never runs and nothing wraps
    it); DeepSpeed calls it only for the layers of this rank's stage.
    """

    def __new__(cls, make_block: Callable[[int], nn.Module], index: int) -> Any:
        return make_block(index)


def run_deepspeed_pipeline(
    make_block: Callable[[int], nn.Module],
    num_blocks: int,
    microbatch_shape: tuple[int, ...],
    num_microbatches: int,
    steps: int,
    warmup: int,
    around_step: Callable[[], ContextManager] | None = None,
    *,
    lr: float = DEFAULT_LR,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mse_loss,
    skip_shm_comm_op: bool = True,
) -> BaselineResult:
    """Train with DeepSpeed's pipeline engine (1F1B ``TrainSchedule``), ``warmup + steps`` steps.

    ``PipelineModule(num_stages=P, partition_method="uniform")`` over ``LayerSpec``s, so each
    rank builds only its own contiguous blocks; a torch SGD optimizer (no DeepSpeed-built
    optimizer op); no fp16/bf16, ZeRO stage 0. Each step: ``barrier``; ``engine.train_batch``
    (forward, backward, optimizer step and zero_grad, all inside DeepSpeed), timed and entered
    inside ``around_step()``. ``skip_shm_comm_op`` (default) keeps DeepSpeed from JIT-compiling
    its shared-memory comm op, which pipeline training never calls (~40 s on a cold
    ``TORCH_EXTENSIONS_DIR``); with ``False`` the first use on a machine compiles it (outside the
    timed steps). Only takes effect if DeepSpeed's comm backend is not yet created in this process.
    """
    _check_common(microbatch_shape, num_microbatches, steps, warmup)
    world, rank = dist.get_world_size(), dist.get_rank()
    stage_block_ranges("DeepSpeed", num_blocks, world, rank)  # validates divisibility
    # PipelineModule reads LOCAL_RANK; launchers other than torchrun/deepspeed may not set it.
    gpus = torch.cuda.device_count()
    os.environ.setdefault("LOCAL_RANK", str(rank % gpus if gpus else rank))

    deepspeed = _import_deepspeed()
    module = _deepspeed_module(deepspeed, make_block, num_blocks, loss_fn, skip_shm_comm_op)
    params = [p for p in module.parameters() if p.requires_grad]
    # torch refuses an empty parameter list; a stage without parameters gets a dummy one.
    optimizer = torch.optim.SGD(params or [nn.Parameter(torch.zeros(1))], lr=lr)
    config = _deepspeed_config(microbatch_shape[0], num_microbatches)
    with _silenced():
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)

    inputs, targets = make_batch(microbatch_shape, num_microbatches, _dtype_of([module]))
    size = microbatch_shape[0]
    stream = itertools.cycle(list(zip(inputs.split(size), targets.split(size), strict=True)))
    is_last = engine.is_last_stage()

    def step() -> float | None:
        loss = engine.train_batch(data_iter=stream)
        if not is_last:
            return None
        return float(loss.detach()) if loss is not None else math.nan

    return _timed_steps(step, steps, warmup, around_step, engine.device)


def _deepspeed_module(
    deepspeed,
    make_block: Callable[[int], nn.Module],
    num_blocks: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    skip_shm_comm_op: bool,
) -> nn.Module:
    """DeepSpeed's communication started and this rank's ``PipelineModule`` (uniform
    partition of ``LayerSpec``s, so only this stage's blocks are built), in a dtype it trains."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.pipe import LayerSpec, PipelineModule

    accelerator = get_accelerator().device_name()
    if (accelerator == "cuda") != (dist.get_backend() == "nccl"):
        wanted = "cuda" if dist.get_backend() == "nccl" else "cpu"
        raise ValueError(
            f"DeepSpeed's accelerator is {accelerator} but the process group is "
            f"{dist.get_backend()}: set DS_ACCELERATOR={wanted} before DeepSpeed is imported"
        )
    with _silenced():
        with _without_shm_comm_op(skip_shm_comm_op):
            deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        module = PipelineModule(
            layers=[LayerSpec(_BuildBlock, make_block, i) for i in range(num_blocks)],
            num_stages=dist.get_world_size(),
            loss_fn=loss_fn,
            partition_method="uniform",
        )
    dtype = _dtype_of([module])
    supported = get_accelerator().supported_dtypes()
    if dtype not in supported:  # e.g. float64 on CPU: DeepSpeed's gradient reduction asserts
        raise ValueError(
            f"DeepSpeed's {get_accelerator().device_name()} accelerator does not train {dtype} "
            f"parameters (supported: {supported}); build the blocks in one of those dtypes"
        )
    return module


def _deepspeed_config(microbatch_size: int, num_microbatches: int) -> dict[str, Any]:
    """Plain pipeline training: fp32, ZeRO stage 0, no clipping, nothing printed."""
    return {
        "train_micro_batch_size_per_gpu": microbatch_size,
        "gradient_accumulation_steps": num_microbatches,
        "train_batch_size": microbatch_size * num_microbatches,  # data-parallel degree 1
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 0.0,
        "dump_state": False,
    }
