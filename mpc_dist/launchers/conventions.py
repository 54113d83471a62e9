"""What other launchers carry, mapped onto the config: accelerate's settings (it exports them as
environment variables to every process it starts) and a DeepSpeed JSON config (the
``--deepspeed_config`` argument of the ``deepspeed`` launcher). A setting we can honour is
applied and said once; one we cannot stops the run with one line naming it and the fix. None is
ignored silently."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import get_args, get_type_hints

from ..config import Config, ConfigError, TrainConfig

COMPILE_BACKENDS = get_args(get_type_hints(TrainConfig)["compile_backend"])
PRECISION = {"no": None, "bf16": "bf16-mixed", "fp16": "fp16-mixed"}
# DeepSpeed keys that need no mapping: logging and batch bookkeeping we check below.
DEEPSPEED_HARMLESS = {"steps_per_print", "wall_clock_breakdown", "dump_state", "prescale_gradients"}


def _set(config: Config, section: str, **values) -> Config:
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **values)}
    )


def _precision(config: Config, wanted: str | None, source: str, notes: list[str]) -> Config:
    if wanted is None or wanted == config.train.precision:
        return config
    if config.train.precision != "fp32":
        raise ConfigError(
            f"{source} asks for {wanted} but train.precision={config.train.precision}; make them "
            f"agree"
        )
    notes.append(f"train.precision={wanted} (from {source})")
    return _set(config, "train", precision=wanted)


def _zero_stage(config: Config, stage: int, source: str) -> Config:
    if stage == 0:
        return config
    fix = "use pipeline.sharding=fsdp (parameters, gradients and optimizer state) instead"
    if stage == 1:
        raise ConfigError(f"{source}: ZeRO stage 1 is not offered; {fix}")
    raise ConfigError(
        f"{source}: ZeRO stage {stage} does not fit the horizon backward (several backward "
        f"passes per block and microbatch; DeepSpeed's own pipeline refuses ZeRO-2/3 too); {fix}"
    )


def from_accelerate(config: Config, environ: Mapping[str, str], notes: list[str]) -> Config:
    if "ACCELERATE_MIXED_PRECISION" not in environ:
        return config  # not started by accelerate
    mixed = environ["ACCELERATE_MIXED_PRECISION"].lower()
    if mixed not in PRECISION:
        raise ConfigError(
            f"accelerate --mixed_precision {mixed}: not supported; use no, bf16 or fp16"
        )
    config = _precision(config, PRECISION[mixed], f"accelerate --mixed_precision {mixed}", notes)
    config = _dynamo(config, environ, notes)
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        config = _fsdp_plugin(config, environ, notes)
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0"))
        config = _zero_stage(config, stage, f"accelerate --zero_stage {stage}")
        for key in ("OFFLOAD_OPTIMIZER_DEVICE", "OFFLOAD_PARAM_DEVICE"):
            device = environ.get(f"ACCELERATE_DEEPSPEED_{key}", "none").lower()
            if device != "none":
                raise ConfigError(
                    f"accelerate --{key.lower()} {device}: offloading is not supported; set none"
                )
        if file := environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            config = from_deepspeed(config, file, notes)
    return config


def _dynamo(config: Config, environ: Mapping[str, str], notes: list[str]) -> Config:
    """accelerate's torch.compile settings: a backend we offer compiles every block
    (accelerate's regional compilation, which ours is)."""
    backend = environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if backend == "no":
        return config
    source = f"accelerate --dynamo_backend {backend}"
    if backend not in COMPILE_BACKENDS:
        raise ConfigError(
            f"{source}: mpc-dist compiles its blocks with {' or '.join(COMPILE_BACKENDS)}; "
            f"launch with --dynamo_backend inductor (or no)"
        )
    mode = environ.get("ACCELERATE_DYNAMO_MODE", "default").lower()
    if mode != "default":
        raise ConfigError(f"accelerate --dynamo_mode {mode}: not offered; use default")
    for option in ("USE_FULLGRAPH", "USE_DYNAMIC"):
        if environ.get(f"ACCELERATE_DYNAMO_{option}", "false").lower() == "true":
            raise ConfigError(
                f"accelerate --dynamo_{option.lower()} true: not offered (mpc-dist compiles each "
                f"block as it is); set false"
            )
    t = config.train
    if t.compile == "blocks" and t.compile_backend != backend:
        raise ConfigError(
            f"{source} but train.compile_backend={t.compile_backend}; make them agree"
        )
    if t.compile != "blocks":
        notes.append(f"train.compile=blocks with train.compile_backend={backend} (from {source})")
    return _set(config, "train", compile="blocks", compile_backend=backend)


def _fsdp_plugin(config: Config, environ: Mapping[str, str], notes: list[str]) -> Config:
    version = environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"accelerate --fsdp_version {version}: mpc-dist shards with FSDP2; use --fsdp_version 2"
        )
    if environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ConfigError("accelerate --fsdp_offload_params true: not supported; set false")
    if environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        notes.append("train.activation_checkpointing=blocks (from accelerate's FSDP plugin)")
        config = _set(config, "train", activation_checkpointing="blocks")
    if environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true":
        notes.append(
            "accelerate's fsdp_reshard_after_forward: parameters stay gathered from the forward "
            "to the step (the horizon backward passes each block several times)"
        )
    notes.append("pipeline.sharding=fsdp (from accelerate's FSDP plugin)")
    return _set(config, "pipeline", sharding="fsdp")


def from_deepspeed(config: Config, path: str, notes: list[str]) -> Config:
    """Map a DeepSpeed JSON config: ZeRO stage, bf16 / fp16, gradient clipping, batch sizes."""
    file = Path(path)
    try:
        spec = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--deepspeed_config {path}: cannot read it ({error})") from None
    source = f"--deepspeed_config {file.name}"
    for key in ("optimizer", "scheduler"):
        if key in spec:
            raise ConfigError(f"{source}: its {key!r} block is not used; set optim.* instead")
    config = _zero_stage(config, int(spec.get("zero_optimization", {}).get("stage", 0)), source)
    for block, precision in (("bf16", "bf16-mixed"), ("fp16", "fp16-mixed")):
        if spec.get(block, {}).get("enabled", False):
            config = _precision(config, precision, f"{source} {block}.enabled", notes)
    if clip := spec.get("gradient_clipping"):
        if config.optim.grad_clip not in (0.0, clip):
            raise ConfigError(
                f"{source}: gradient_clipping={clip} but optim.grad_clip="
                f"{config.optim.grad_clip}; make them agree"
            )
        config = _set(config, "optim", grad_clip=float(clip))
    d, p = config.data, config.pipeline
    ours = {
        "train_batch_size": d.batch_size,
        "train_micro_batch_size_per_gpu": d.batch_size // (d.num_microbatches * p.replicas),
        "gradient_accumulation_steps": d.num_microbatches,
    }
    for key, value in ours.items():
        if key in spec and spec[key] not in ("auto", value):
            raise ConfigError(
                f"{source}: {key}={spec[key]}, but the config means {value} (data.batch_size, "
                f"data.num_microbatches, pipeline.replicas)"
            )
    unused = sorted(
        set(spec)
        - {"zero_optimization", "bf16", "fp16", "gradient_clipping"}
        - set(ours)
        - DEEPSPEED_HARMLESS
    )
    if unused:
        raise ConfigError(f"{source}: {unused} have no mpc-dist equivalent; remove them")
    return config


def apply_launcher_settings(
    config: Config, deepspeed_config: str | None = None, environ: Mapping[str, str] = os.environ
) -> tuple[Config, list[str]]:
    """``config`` with what accelerate or DeepSpeed asked for; and one note per mapped setting."""
    notes: list[str] = []
    config = from_accelerate(config, environ, notes)
    if deepspeed_config:
        config = from_deepspeed(config, deepspeed_config, notes)
    return config, notes
