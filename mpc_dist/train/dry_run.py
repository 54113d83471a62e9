"""``mpc-dist train --dry-run``: the stage map of a config, from the model built on the meta
device (nothing allocated): blocks, parameters, optimizer state, activation messages and the
activations each stage holds under the chosen horizon and schedule, and memory per device."""

from __future__ import annotations

import torch

from ..config import Config
from ..console import console
from ..core import Plan
from ..data import check_data
from ..devices import dtype_of
from ..models import BlockModel, build_model
from ..parallel import generate, held_microbatches, partition, stage_ranges, uniform_partition
from .precision import AUTOCAST
from .stage import schedule_spec
from .validate import validate_config

MiB = 2**20
ADAM_STATES = {"adamw": 2, "adam": 2, "sgd": 1}  # fp32 tensors of optimizer state per parameter


def saved_bytes_per_sample(model: BlockModel, t: int) -> int:
    """Bytes autograd saves for block t's backward, per sample (a meta forward of 2 samples:
    no memory, no compute). Tensors saved twice count twice: an upper estimate."""
    params = {id(p) for p in model.parameters()}
    total = [0]

    def pack(tensor: torch.Tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in params and id(base) not in params:
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    x = torch.zeros(2, *model.state_shapes[t] if t else model.input_shape, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.block_forward(t, x.requires_grad_(t > 0))
    return total[0] // 2


def dry_run(config: Config) -> list[dict]:
    """Print the stage map; returns its rows (for tests)."""
    rows, model, microbatch = stage_map(config)
    _print(config, model, rows, microbatch)
    return rows


def stage_map(config: Config) -> tuple[list[dict], BlockModel, int]:
    """The rows of the stage map (``memory_bytes``: the estimate per device), the meta-device
    model and the microbatch size; prints nothing."""
    validate_config(config)
    input_shape, num_classes = check_data(config)  # disk sources too
    model = build_model(config.model, input_shape, num_classes, device="meta")
    p, t, d = config.pipeline, config.train, config.data
    h = config.horizon.horizon
    plan = Plan(
        config.horizon.rule, h if isinstance(h, int) else model.num_blocks, model.num_blocks
    )
    # a time partition is profiled at start-up; here it is shown uniform
    counts = uniform_partition(model.num_blocks, p.stages) if p.partition == "time" else None
    ranges = stage_ranges(counts or partition(p, model))
    microbatch = d.batch_size // (d.num_microbatches * p.replicas)
    param_bytes = torch.tensor([], dtype=dtype_of(t.dtype)).element_size()
    compute = AUTOCAST[t.precision]
    act_bytes = torch.tensor([], dtype=compute).element_size() if compute else param_bytes
    shard = p.replicas if p.sharding != "none" else 1
    schedule = generate(plan, ranges, schedule_spec(config), 2)
    held = held_microbatches(schedule)
    rows = []
    for k, (first, last) in enumerate(ranges):
        part = model.split(first, last, plan.reads_shared_head_below_top(model.head_mode))
        params = sum(q.numel() for q in part.parameters())
        trainable = sum(q.numel() for q in part.owned_parameters())
        if config.model.lora is not None:  # the adapters and the heads
            trainable = sum(
                q.numel()
                for n, q in part.named_parameters()
                if n.startswith(("head.", "aux_heads."))
            )
            trainable += _adapter_params(part, config.model.lora)
        optimizer = ADAM_STATES[config.optim.name] * trainable * 4 // shard
        if t.activation_checkpointing == "blocks":  # only each block's input is kept
            per_sample = sum(4 * _numel(model.state_shapes[b]) for b in range(first, last))
        else:
            per_sample = sum(saved_bytes_per_sample(model, b) for b in range(first, last))
        per_microbatch = per_sample * microbatch * act_bytes // 4
        message = _numel(model.state_shapes[first]) * microbatch * act_bytes
        weights = params * param_bytes // (shard if p.sharding == "fsdp" else 1)
        grads = trainable * param_bytes
        held_bytes = per_microbatch * held[k]
        rows.append(
            {
                "stage": k,
                "blocks": f"{first}-{last - 1}",
                "params": params,
                "trainable": trainable,
                "optimizer_bytes": optimizer,
                "message_in_bytes": message if k else 0,
                "activation_bytes_per_microbatch": per_microbatch,
                "held_microbatches": held[k],
                "activations_held_bytes": held_bytes,
                "memory_bytes": weights + grads + optimizer + held_bytes,
            }
        )
    return rows, model, microbatch


def _adapter_params(part: BlockModel, lora) -> int:
    """LoRA's A (rank x in) and B (out x rank) for every targeted linear layer of the blocks."""
    return sum(
        lora.rank * (module.in_features + module.out_features)
        for name, module in part.blocks.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.targets
    )


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _print(config: Config, model: BlockModel, rows: list[dict], microbatch: int) -> None:
    from rich.console import Console
    from rich.table import Table

    p, t = config.pipeline, config.train
    table = Table(
        title=f"{config.model.name}: {model.num_blocks} blocks, {config.horizon.rule} "
        f"h={config.horizon.horizon}, {p.stages} stages x {p.replicas} replicas, {p.mode}, "
        f"m = {config.data.num_microbatches} microbatches of {microbatch}, {t.precision}, "
        f"sharding {p.sharding}, activation checkpointing {t.activation_checkpointing}"
    )
    columns = (
        "stage",
        "blocks",
        "params M",
        "trainable M",
        "optimizer MiB",
        "message in MiB",
        "activations MiB",
        "held",
        "held MiB",
        "memory MiB",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["stage"]),
            r["blocks"],
            f"{r['params'] / 1e6:.1f}",
            f"{r['trainable'] / 1e6:.1f}",
            f"{r['optimizer_bytes'] / MiB:.0f}",
            f"{r['message_in_bytes'] / MiB:.2f}",
            f"{r['activation_bytes_per_microbatch'] / MiB:.1f}",
            str(r["held_microbatches"]),
            f"{r['activations_held_bytes'] / MiB:.0f}",
            f"{r['memory_bytes'] / MiB:.0f}",
        )
    wide = Console(stderr=True, width=max(console.width, 132))
    wide.print(table)
    wide.print(
        "Per stage and device. message in: the activation one microbatch brings from the stage "
        "below; activations: saved for backward per microbatch; held: most microbatches a stage "
        "holds at once under this schedule; memory: weights + gradients + optimizer state + "
        "activations held (an estimate from the meta-device model: nothing was allocated; "
        "framework buffers and temporaries are not counted)."
    )
