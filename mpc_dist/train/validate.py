"""Config validation: every field that can be checked without data or processes, so bad input
fails in one line naming the field and the fix before any training starts. Values outside a
field's fixed set (its ``Literal`` type in ``config.py``) are refused when the config is loaded;
here are the checks of ranges and of fields together. The model registry and the plan check
their own sections."""

from __future__ import annotations

import torch

from ..config import Config, ConfigError
from ..core import HORIZON_RULES, Plan, check_horizon
from ..data import check_data, check_num_classes, mixes
from ..models import build_model, check_model
from ..rules import check_rule


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(config: Config) -> None:
    """Check every field that can be checked before data is read or processes start."""
    d, o, t = config.data, config.optim, config.train
    input_shape, num_classes = check_data(config)  # data and augment, and what is on disk
    blocks = check_model(config.model, input_shape, num_classes)  # the registry knows them
    _validate_horizon(config, blocks)
    m = config.model
    if config.horizon.rule not in HORIZON_RULES or m.kwargs or ":" in m.name:
        model = build_model(config.model, input_shape, num_classes, device="meta")
        state = torch.zeros(1, *model.state_shapes[model.num_blocks], device="meta")
        check_num_classes(num_classes, model.head(state).shape[-1], "model.name=" + m.name)
    if config.horizon.rule not in HORIZON_RULES:
        _validate_non_horizon_rule(config, model)
    need(d.batch_size >= 1, f"data.batch_size={d.batch_size}: must be >= 1")
    need(d.num_microbatches >= 1, f"data.num_microbatches={d.num_microbatches}: must be >= 1")
    suggestion = d.num_microbatches * max(1, d.batch_size // d.num_microbatches)
    need(
        d.batch_size % d.num_microbatches == 0,
        f"data.batch_size={d.batch_size}: must be divisible by data.num_microbatches="
        f"{d.num_microbatches}; e.g. data.batch_size={suggestion}",
    )
    need(d.eval_batch_size >= 1, f"data.eval_batch_size={d.eval_batch_size}: must be >= 1")
    need(o.lr > 0, f"optim.lr={o.lr}: must be > 0")
    need(all(0 < f < 1 for f in o.decay_at), f"optim.decay_at={o.decay_at}: fractions in (0, 1)")
    need(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables)")
    need(t.epochs >= 1, f"train.epochs={t.epochs}: must be >= 1")
    need(
        t.precision == "fp32" or t.dtype == "float32",
        f"train.precision={t.precision}: mixed precision keeps float32 master weights; "
        f"set train.dtype=float32",
    )
    need(t.max_steps >= 0, f"train.max_steps={t.max_steps}: must be >= 0")
    need(t.log_every >= 1, f"train.log_every={t.log_every}: must be >= 1")
    need(t.eval_every >= 0, f"train.eval_every={t.eval_every}: must be >= 0 (0: epoch ends)")
    need(config.run.checkpoint_every >= 0, "run.checkpoint_every: must be >= 0")
    need(config.run.keep_checkpoints >= 1, "run.keep_checkpoints: must be >= 1")
    _validate_layout(config, blocks)
    _validate_pipeline(config, blocks)
    _validate_ray(config)


def _validate_horizon(config: Config, blocks: int) -> None:
    h = config.horizon
    if not isinstance(h.horizon, str):
        check_horizon(h.rule, h.horizon, blocks)
        return
    need(
        h.horizon == "auto",
        f"horizon.horizon={h.horizon!r}: use a number of blocks in [1, {blocks}] or auto",
    )
    need(
        h.objective != "memory" or h.memory_budget_mib > 0,
        "horizon.memory_budget_mib: set the budget per device (MiB) for horizon.objective=memory",
    )
    need(0 <= h.min_alignment <= 1, f"horizon.min_alignment={h.min_alignment}: within [0, 1]")
    need(h.min_progress <= 1, f"horizon.min_progress={h.min_progress}: at most 1 (BP's progress)")
    need(h.probe_batches >= 1, f"horizon.probe_batches={h.probe_batches}: must be >= 1")
    need(h.progress_steps >= 0, f"horizon.progress_steps={h.progress_steps}: must be >= 0")
    need(
        h.reselect_every == 0 or config.world_size == 1,
        f"horizon.reselect_every={h.reselect_every}: a pipeline keeps the horizon chosen at "
        f"start; set it to 0 (re-selection is for single-process runs)",
    )


def _validate_non_horizon_rule(config: Config, model) -> None:
    rule, t = config.horizon.rule, config.train
    need(
        config.horizon.horizon != "auto",
        f"horizon.horizon=auto: chooses among the horizon rules {HORIZON_RULES}, not rule "
        f"{rule}; set horizon.horizon=1 (or horizon.rule=receding)",
    )
    check_rule(rule, model, config.rules, config.pipeline.stages)
    need(
        not mixes(config.augment),
        f"augment.mixup/cutmix/label_smoothing: rule {rule} trains on class labels, not on "
        f"soft targets; set augment.mixup=0, augment.cutmix=0, augment.label_smoothing=0",
    )
    need(
        not config.pipeline.defer_weights,
        f"pipeline.defer_weights=true: rule {rule} takes no input gradients, there is nothing to "
        f"defer; set pipeline.defer_weights=false",
    )
    by_hand = rule in ("forward_gradient", "pepita")  # their updates are formed by hand
    need(
        not by_hand or t.activation_checkpointing == "none",
        f"train.activation_checkpointing={t.activation_checkpointing}: rule {rule} keeps no "
        f"graph of its blocks between forward and update, there is nothing to recompute; set "
        f"train.activation_checkpointing=none",
    )
    need(
        not by_hand or t.compile == "none",
        f"train.compile={t.compile}: rule {rule} hooks each linear layer around every block "
        f"call, which a compiled block skips or recompiles for; set train.compile=none",
    )
    need(
        rule != "pepita" or config.model.lora is None,
        "model.lora: rule pepita forms the update of each block's one linear layer by hand, "
        "adapters would add layers it does not train; remove model.lora",
    )
    need(
        rule not in ("forward_gradient", "pepita") or t.precision == "fp32",
        f"train.precision={t.precision}: rule {rule} forms its updates in the parameters' "
        f"dtype; set train.precision=fp32",
    )


def _validate_layout(config: Config, blocks: int) -> None:
    """Stages, replicas, the blocks on each and how a minibatch divides over them."""
    p, h, d = config.pipeline, config.horizon, config.data
    need(p.stages >= 1, f"pipeline.stages={p.stages}: must be >= 1")
    need(p.replicas >= 1, f"pipeline.replicas={p.replicas}: must be >= 1")
    need(
        p.stages <= blocks,
        f"pipeline.stages={p.stages}: {config.model.name} has only {blocks} blocks; "
        f"use at most {blocks} stages",
    )
    need(
        p.schedule == "auto" or h.horizon == blocks,  # auto: not an int, refused here too
        f"pipeline.schedule={p.schedule}: a back-propagation schedule needs horizon.horizon="
        f"{blocks}; use pipeline.schedule=auto for horizon {h.horizon}",
    )
    if p.partition == "explicit" or p.blocks_per_stage is not None:
        counts = p.blocks_per_stage or []
        even = [blocks // p.stages + (i < blocks % p.stages) for i in range(p.stages)]
        need(
            len(counts) == p.stages and all(c >= 1 for c in counts) and sum(counts) == blocks,
            f"pipeline.blocks_per_stage={counts}: need {p.stages} positive counts summing to "
            f"{blocks}, e.g. {even}",
        )
    need(
        d.batch_size % (d.num_microbatches * p.replicas) == 0,
        f"data.batch_size={d.batch_size}: must be divisible by data.num_microbatches x "
        f"pipeline.replicas = {d.num_microbatches * p.replicas}",
    )


def _validate_pipeline(config: Config, blocks: int) -> None:
    """Modes, timeouts, sharding and backends the layout can run."""
    p = config.pipeline
    copies_head = p.stages > 1 and _reads_shared_head_below_top(config, blocks)
    need(
        not (p.mode == "async" and copies_head),
        "pipeline.mode=async: a shared head couples every stage to the last one; "
        "set model.head=aux or pipeline.mode=sync",
    )
    need(p.async_window >= 1, f"pipeline.async_window={p.async_window}: must be >= 1")
    need(
        not (p.mode == "async" and p.stages > 1 and config.train.precision == "fp16-mixed"),
        "train.precision=fp16-mixed: every stage must share one loss scale and skip the same "
        "steps, a check across stages at every step that async mode has no barrier for; use "
        "train.precision=bf16-mixed (no scaling) or pipeline.mode=sync",
    )
    need(p.timeout > 0, f"pipeline.timeout={p.timeout}: must be > 0 seconds")
    need(
        p.collective_timeout >= p.timeout,
        f"pipeline.collective_timeout={p.collective_timeout}: must be at least pipeline.timeout"
        f"={p.timeout} (collectives wait for the slowest rank's checkpoint or measurement)",
    )
    need(
        not (p.sharding == "fsdp" and copies_head),
        "pipeline.sharding=fsdp: the read-only copies of a shared head on earlier stages are "
        "not sharded; set model.head=aux (or horizon.horizon to the number of blocks)",
    )
    need(
        p.fsdp_param_dtype == "float32"
        or (p.sharding == "fsdp" and config.train.precision == "bf16-mixed"),
        "pipeline.fsdp_param_dtype=bfloat16: bf16 parameters are for pipeline.sharding=fsdp "
        "with train.precision=bf16-mixed; set those or pipeline.fsdp_param_dtype=float32",
    )
    need(
        not (p.backend == "nccl" and config.train.device == "cpu"),
        "pipeline.backend=nccl: NCCL needs GPUs but train.device=cpu; use pipeline.backend=gloo",
    )
    device = config.train.device
    on_gpus = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    need(
        not (p.backend == "gloo" and on_gpus and config.world_size > 1),
        "pipeline.backend=gloo: gloo cannot send CUDA tensors between stages; use "
        "pipeline.backend=auto (NCCL on GPUs) or train.device=cpu",
    )


def _reads_shared_head_below_top(config: Config, blocks: int) -> bool:
    """Earlier stages hold read-only copies of a shared head (any horizon may be chosen by
    ``auto``)."""
    h = config.horizon
    if h.horizon == "auto":
        return config.model.head == "shared"
    return Plan(h.rule, h.horizon, blocks).reads_shared_head_below_top(config.model.head)


def _validate_ray(config: Config) -> None:
    r = config.ray
    need(r.cpus_per_worker > 0, f"ray.cpus_per_worker={r.cpus_per_worker}: must be > 0")
    need(r.max_failures >= -1, f"ray.max_failures={r.max_failures}: >= 0, or -1 for unlimited")
