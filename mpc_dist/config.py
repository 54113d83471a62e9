"""Typed run configuration: YAML file < CLI overrides (``--set section.key=value``) over defaults.

Unknown sections or keys are errors. ``validate`` checks everything that can be checked without
data or processes, so bad input fails in one line before any training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the field and the fix."""


@dataclass
class ModelConfig:
    # deep_linear | residual_mlp | vit_tiny | vit_b_16 | vit_l_16 | resnet18 | resnet50
    name: str = "residual_mlp"
    num_blocks: int = 8  # T for deep_linear, residual_mlp, vit_tiny (fixed by the others)
    width: int = 256  # state width (hidden_dim for vit_tiny)
    hidden: int = 512  # MLP hidden width inside a block
    head: str = "shared"  # loss head at s < T: shared (the model's head, read-only) | aux
    patch_size: int = 7  # vit_tiny
    num_heads: int = 4  # vit_tiny
    scaled: bool = True  # deep_linear: W(t) = I + W~(t)/T (else I + W~(t))


@dataclass
class HorizonConfig:
    rule: str = "receding"  # receding (the paper's g_h) | shrinking (greedy groups of h blocks)
    horizon: int = 4  # h, 1 <= h <= T; h = T is back-propagation


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | fashion_mnist | cifar10 | cifar100 | synthetic
    root: str | None = None  # folder with dataset files (CIFAR; optional for MNIST variants)
    batch_size: int = 128  # minibatch (one optimizer step)
    num_microbatches: int = 1  # microbatches per minibatch; must divide batch_size
    eval_batch_size: int = 1000
    synthetic_size: int = 2048  # samples per split of the synthetic set


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine | constant (per step, after warmup)
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global gradient norm; 0 disables


@dataclass
class TrainConfig:
    epochs: int = 3
    seed: int = 0
    dtype: str = "float32"  # float32 | float64 | bfloat16
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    max_steps: int = 0  # stop after this many optimizer steps; 0 = run all epochs
    log_every: int = 50  # steps between metric lines in metrics.jsonl


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run writes to out_dir/name
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at epoch ends only
    keep_checkpoints: int = 2
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed
    plot: bool = True  # write plot.png (train loss, test accuracy) at the end
    progress: bool = True  # show a progress bar


@dataclass
class PipelineConfig:
    stages: int = 1  # P pipeline stages (processes per replica); 1 = single-process training
    replicas: int = 1  # D data-parallel copies of the pipeline; world size = P * D
    mode: str = "sync"  # sync (flush + step together per minibatch) | async (spec section 4)
    schedule: str = "auto"  # auto (horizon schedule) | 1f1b | gpipe (back-propagation only)
    partition: str = "uniform"  # uniform | params | time (profiled) | explicit (blocks_per_stage)
    blocks_per_stage: list[int] | None = None  # explicit partition, e.g. [3, 2, 2, 1]
    async_window: int = 32  # minibatches per async schedule; the pipeline drains between them
    timeout: float = 45.0  # seconds any rank waits on a message or a peer before failing
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    horizon: HorizonConfig = field(default_factory=HorizonConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    @property
    def world_size(self) -> int:
        return self.pipeline.stages * self.pipeline.replicas

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def _coerce(where: str, value: Any, kind: Any) -> Any:
    if type(None) in get_args(kind):  # `X | None`
        if value is None:
            return None
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r}: expected a list of {item.__name__}")
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if kind is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}={value!r}: expected {kind.__name__}")
    return value


def from_dict(raw: dict[str, Any]) -> Config:
    config = Config()
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping of sections")
    sections = {f.name for f in dataclasses.fields(Config)}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"{section}: unknown section; use one of {sorted(sections)}")
        target = getattr(config, section)
        hints = get_type_hints(type(target))
        for key, value in (values or {}).items():
            if key not in hints:
                raise ConfigError(f"{section}.{key}: unknown key; {section} takes {sorted(hints)}")
            setattr(target, key, _coerce(f"{section}.{key}", value, hints[key]))
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < YAML file < ``section.key=value`` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file; see configs/ for examples")
        raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1:
            raise ConfigError(f"--set {item}: expected section.key=value, e.g. horizon.horizon=2")
        section, name = key.split(".")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][name] = yaml.safe_load(value)
    return from_dict(raw)


# ----------------------------------------------------------------------------- validation


def validate(config: Config) -> None:
    """Check every field that can be checked before data is read or processes start."""
    from .data import DATASETS
    from .models import HEAD_MODES, MODELS, num_blocks_of
    from .plan import RULES

    m, h, d, o, t = config.model, config.horizon, config.data, config.optim, config.train

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(m.name in MODELS, f"model.name={m.name!r}: unknown model; use one of {MODELS}")
    need(m.head in HEAD_MODES, f"model.head={m.head!r}: unknown; use one of {HEAD_MODES}")
    need(m.num_blocks >= 1, f"model.num_blocks={m.num_blocks}: must be >= 1")
    need(m.width >= 1 and m.hidden >= 1, "model.width/model.hidden: must be >= 1")
    blocks = num_blocks_of(m)
    need(h.rule in RULES, f"horizon.rule={h.rule!r}: unknown rule; use one of {RULES}")
    need(
        1 <= h.horizon <= blocks,
        f"horizon.horizon={h.horizon}: must be in [1, {blocks}] ({m.name} has {blocks} blocks); "
        f"horizon {blocks} is back-propagation",
    )
    need(d.dataset in DATASETS, f"data.dataset={d.dataset!r}: unknown; use one of {DATASETS}")
    need(d.batch_size >= 1, f"data.batch_size={d.batch_size}: must be >= 1")
    need(d.num_microbatches >= 1, f"data.num_microbatches={d.num_microbatches}: must be >= 1")
    suggestion = d.num_microbatches * max(1, d.batch_size // d.num_microbatches)
    need(
        d.batch_size % d.num_microbatches == 0,
        f"data.batch_size={d.batch_size}: must be divisible by data.num_microbatches="
        f"{d.num_microbatches}; e.g. data.batch_size={suggestion}",
    )
    need(d.eval_batch_size >= 1, f"data.eval_batch_size={d.eval_batch_size}: must be >= 1")
    need(o.name in ("adamw", "adam", "sgd"), f"optim.name={o.name!r}: use adamw, adam or sgd")
    need(o.lr > 0, f"optim.lr={o.lr}: must be > 0")
    need(o.schedule in ("cosine", "constant"), f"optim.schedule={o.schedule!r}: cosine|constant")
    need(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables)")
    need(t.epochs >= 1, f"train.epochs={t.epochs}: must be >= 1")
    need(t.dtype in ("float32", "float64", "bfloat16"), f"train.dtype={t.dtype!r}: unknown")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r}: auto|cpu|cuda")
    need(t.max_steps >= 0, f"train.max_steps={t.max_steps}: must be >= 0")
    need(t.log_every >= 1, f"train.log_every={t.log_every}: must be >= 1")
    need(config.run.checkpoint_every >= 0, "run.checkpoint_every: must be >= 0")
    need(config.run.keep_checkpoints >= 1, "run.keep_checkpoints: must be >= 1")
    _validate_pipeline(config, blocks)


def _validate_pipeline(config: Config, blocks: int) -> None:
    p, h, d = config.pipeline, config.horizon, config.data

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(p.stages >= 1, f"pipeline.stages={p.stages}: must be >= 1")
    need(p.replicas >= 1, f"pipeline.replicas={p.replicas}: must be >= 1")
    need(
        p.stages <= blocks,
        f"pipeline.stages={p.stages}: {config.model.name} has only {blocks} blocks; "
        f"use at most {blocks} stages",
    )
    need(p.mode in ("sync", "async"), f"pipeline.mode={p.mode!r}: use sync or async")
    need(
        p.schedule in ("auto", "1f1b", "gpipe"),
        f"pipeline.schedule={p.schedule!r}: use auto, 1f1b or gpipe",
    )
    need(
        p.schedule == "auto" or h.horizon == blocks,
        f"pipeline.schedule={p.schedule}: a back-propagation schedule needs horizon.horizon="
        f"{blocks}; use pipeline.schedule=auto for horizon {h.horizon}",
    )
    need(
        p.partition in ("uniform", "params", "time", "explicit"),
        f"pipeline.partition={p.partition!r}: use uniform, params, time or explicit",
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
    need(
        not (p.mode == "async" and p.stages > 1 and config.model.head == "shared"
             and h.horizon < blocks),
        "pipeline.mode=async: a shared head couples every stage to the last one; "
        "set model.head=aux or pipeline.mode=sync",
    )  # fmt: skip
    need(p.async_window >= 1, f"pipeline.async_window={p.async_window}: must be >= 1")
    need(p.timeout > 0, f"pipeline.timeout={p.timeout}: must be > 0 seconds")
    need(p.backend in ("auto", "gloo", "nccl"), f"pipeline.backend={p.backend!r}: auto|gloo|nccl")
