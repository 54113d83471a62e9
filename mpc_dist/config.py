"""Typed run configuration: YAML file < CLI overrides (``--set section.key=value``) over defaults.

Dataclasses and loading only: the lowest layer, importing nothing of mpc_dist. Unknown sections
or keys are errors; ``mpc_dist.train.validate`` checks the values before anything starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the field and the fix."""


# Names with a fixed set of values. Loading refuses any other value in one line; the owners of
# the names (core for rules, horizon for objectives) read their lists from these types.
HorizonRule = Literal["receding", "shrinking"]  # the paper's g_h | greedy groups of h blocks
LocalRule = Literal["ff", "sff", "forward_gradient"]  # block-local rules (docs/rules.md)
TopDownRule = Literal["pepita"]  # a second forward pass carries the updates
Rule = Literal[HorizonRule, LocalRule, TopDownRule]
Objective = Literal["memory", "speed", "tradeoff"]
HeadMode = Literal["shared", "aux", "goodness"]


@dataclass
class LoraConfig:
    """LoRA adapters in the blocks (through peft); the base weights are frozen."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # module names in a block
    dropout: float = 0.0


@dataclass
class ModelConfig:
    # deep_linear | residual_mlp | relu_mlp | vit_tiny | vit_b_16 | vit_l_16 | resnet_small |
    # resnet18 | resnet50 | local_mixer, or timm/<name> (a timm ViT, e.g.
    # timm/vit_base_patch16_224), or package.module:function (your own builder, see
    # mpc_dist.models.pipeline_model)
    name: str = "residual_mlp"
    num_blocks: int = 8  # T for deep_linear, residual_mlp, relu_mlp, vit_tiny, resnet_small
    width: int = 256  # state width (hidden_dim for vit_tiny, first channels for resnet_small)
    hidden: int = 512  # MLP hidden width inside a block
    head: HeadMode = "shared"  # loss head at s < T: shared (the model's head, read-only) | aux |
    # goodness (scalable forward-forward's: a 1x1 convolution, a class's goodness = mean square)
    patch_size: int = 7  # vit_tiny; local_mixer (pixels per patch side)
    num_heads: int = 4  # vit_tiny
    scaled: bool = True  # deep_linear: W(t) = I + W~(t)/T (else I + W~(t))
    image_size: int | None = None  # ViTs: build for this size (inputs are resized); None: data's
    weights: str | None = None  # pretrained weights: a .safetensors or torch file (local)
    lora: LoraConfig | None = None  # e.g. {rank: 8, alpha: 16, targets: [qkv, proj]}
    # more arguments: timm.create_model's for timm/ models, relu_mlp's {init: torch|normal|
    # he_uniform, bias: bool}, local_mixer's {groups: G}
    kwargs: dict[str, Any] | None = None


@dataclass
class HorizonConfig:
    rule: Rule = "receding"  # receding (the paper's g_h) | shrinking (greedy groups of h blocks)
    # | ff | sff | forward_gradient (block-local rules, horizon 1) | pepita (docs/rules.md)
    horizon: int | Literal["auto"] = 4  # h, 1 <= h <= T (T: back-propagation), or auto (h, rule)
    # horizon: auto chooses by measuring every rule and h on the model, data and device:
    objective: Objective = "tradeoff"  # memory (budget) | speed (min_alignment, min_progress) |
    # tradeoff (penalty)
    memory_budget_mib: float = 0.0  # memory: the most per device
    min_alignment: float = 0.5  # speed: cos^2(theta_h) with back-propagation at least
    min_progress: float = 0.95  # speed: and measured progress (relative to BP's) at least
    penalty: float = 0.5  # tradeoff: score - penalty x (step time / back-propagation's)
    probe_batches: int = 4  # microbatches the candidates are measured on
    progress_steps: int = 200  # training steps per candidate of the loss-progress score; 0: score
    # by predicted alignment alone (misleads, see docs/horizon-study.md)
    reselect_every: int = 0  # epochs between re-selections (single process); 0: at start only


@dataclass
class DataConfig:
    # In memory: mnist | fashion_mnist | cifar10 | cifar100 | synthetic. From disk (data.root):
    # folder (ImageNet layout: root/train and root/val of class folders of images) | tar (root/
    # train.tar and root/val.tar of class folders, or root/train/ and root/val/ of per-class
    # tars) | wds (WebDataset shards root/*.tar with timm's _info.json) | hf (a Hugging Face
    # dataset saved with save_to_disk). See docs/data.md.
    dataset: str = "mnist"
    root: str | None = None  # dataset files (CIFAR, the disk sources; optional for MNIST)
    batch_size: int = 128  # minibatch (one optimizer step)
    num_microbatches: int = 1  # microbatches per minibatch; must divide batch_size
    eval_batch_size: int = 1000
    standardise: bool = True  # inputs to zero mean, unit variance per channel; false: pixels in
    # [0, 1] only (PEPITA's codes feed those: its feedback matrix's scale is set against them)
    synthetic_size: int = 2048  # samples per split of the synthetic set
    image_size: int | None = None  # side of the images fed to the model; None: the in-memory
    # set's own (28, 32), 224 for disk sources. In memory, a size other than the set's own
    # resizes through the image path (timm's transforms), like augment.enabled does
    num_workers: int = 0  # DataLoader worker processes decoding images (0: in the trainer's)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    shuffle: bool = True  # shuffle the training split each epoch (the evaluation split never)
    shuffle_buffer: int = 2048  # wds: samples in the seeded shuffle buffer across shards
    # a corrupt or truncated image or shard: fail (stop, naming the file) | skip (count it,
    # report it at the end; its row takes the batch's next good one)
    on_error: Literal["fail", "skip"] = "fail"


@dataclass
class AugmentConfig:
    """Training augmentation through timm (create_transform, Mixup); off by default. Values and
    their meaning are timm's (train.py's arguments of the same names); docs/data.md."""

    enabled: bool = False  # the training split's per-image transform: random resized crop, flip,
    # auto_augment, color_jitter, random erasing; false: the evaluation transform (resize + crop)
    auto_augment: str | None = None  # e.g. rand-m9-mstd0.5-inc1 (RandAugment, DeiT); None: none
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random resized crop area
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])  # its aspect ratios
    hflip: float = 0.5  # horizontal flip probability
    color_jitter: float = 0.4  # timm applies it only without auto_augment
    re_prob: float = 0.0  # random erasing probability (DeiT: 0.25)
    re_mode: Literal["const", "rand", "pixel"] = "pixel"  # random erasing fill
    re_count: int = 1  # random erasing regions
    interpolation: Literal["bilinear", "bicubic", "nearest", "random"] = "bilinear"  # resize
    crop_pct: float = 0.875  # evaluation: resize to image_size / crop_pct, centre crop
    mean: list[float] | None = None  # normalization; None: the in-memory set's own, or
    std: list[float] | None = None  # ImageNet's (timm's default) for images from disk
    # Batch-level, on each microbatch (soft targets (N, C); on without augment.enabled too):
    mixup: float = 0.0  # mixup alpha; 0: off (DeiT: 0.8)
    cutmix: float = 0.0  # cutmix alpha; 0: off (DeiT: 1.0)
    mixup_prob: float = 1.0  # probability of mixing a microbatch (or element, see mixup_mode)
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    # one draw per microbatch, per pair or per sample
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.0  # (DeiT: 0.1)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    # cosine | constant | halfway_linear (constant, then linear to zero over the second half:
    # forward-forward's) | step (times decay_factor at each of decay_at); per step, after warmup
    schedule: Literal["cosine", "constant", "halfway_linear", "step"] = "cosine"
    decay_at: list[float] = field(default_factory=list)  # step: fractions of training: [0.6, 0.9]
    decay_factor: float = 0.1  # step: the factor at each of decay_at
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global gradient norm; 0 disables
    # a non-finite loss or gradient norm: stop (the last checkpoint kept) | skip the step
    on_nonfinite: Literal["stop", "skip"] = "stop"


@dataclass
class RulesConfig:
    """Options of the rules beyond the horizon (docs/rules.md); each names its rule."""

    ff_peer_normalisation: float = 0.0  # ff: weight of the peer-normalisation loss, which pulls
    # each unit's running mean activity (positive data) to its layer's mean (Hinton, loeweX: 0.03)
    ff_straight_through: bool = False  # ff: that loss's gradient passes the ReLU where it is off
    ff_readout_lr_scale: float = 1.0  # ff: the readout's gradients times this (loeweX: 10)
    pepita_dropout: float = 0.0  # pepita: dropout of hidden units, one mask for both passes (0.1)
    pepita_feedback_scale: float = 0.05  # pepita: F ~ U[-1, 1] x this x sqrt(6 / inputs)
    pepita_normalise: bool = False  # pepita: each hidden layer's output scaled to unit RMS
    pepita_mirror_lr: float = 0.0  # pepita: weight mirroring (0: F stays fixed); the rate at which
    # each layer's feedback factor B_l moves to its mirror estimate, F = B_0 ... B_L
    pepita_mirror_every: int = 1  # pepita: optimizer steps between mirroring updates


@dataclass
class TrainConfig:
    epochs: int = 3
    seed: int = 0
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"  # of the parameters
    # autocast in bf16 or fp16 with fp32 master weights, or plain fp32
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed"] = "fp32"
    activation_checkpointing: Literal["none", "blocks"] = "none"  # blocks: recompute in backward
    compile: Literal["none", "blocks"] = "none"  # blocks: torch.compile each block and head
    # inductor (generated kernels) | aot_eager (traced, no code generation: checks, debugging)
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when present
    tf32: bool = True  # CUDA: fp32 matmuls/convolutions on TF32 tensor cores; false: full fp32
    max_steps: int = 0  # stop after this many optimizer steps; 0 = run all epochs
    log_every: int = 50  # steps between metric lines in metrics.jsonl
    eval_every: int = 0  # steps between test-set evaluations besides epoch ends; 0: epoch ends


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run writes to out_dir/name
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at epoch ends only
    keep_checkpoints: int = 2
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed
    plot: bool = True  # write plot.png (train loss, test accuracy) at the end
    progress: bool = True  # show a progress bar
    resume_fallback: bool = False  # resuming: skip a damaged latest checkpoint for the one before


@dataclass
class PipelineConfig:
    stages: int = 1  # P pipeline stages (processes per replica); 1 = single-process training
    replicas: int = 1  # D data-parallel copies of the pipeline; world size = P * D
    mode: Literal["sync", "async"] = "sync"  # flush + step together per minibatch | spec sec. 4
    # auto (the horizon schedule) | 1f1b | gpipe (the last two for back-propagation only)
    schedule: Literal["auto", "1f1b", "gpipe"] = "auto"
    defer_weights: bool = False  # zero-bubble: weight gradients deferred to fill idle time
    # uniform | params | time (profiled) | explicit (blocks_per_stage)
    partition: Literal["uniform", "params", "time", "explicit"] = "uniform"
    blocks_per_stage: list[int] | None = None  # explicit partition, e.g. [3, 2, 2, 1]
    async_window: int = 64  # minibatches per async schedule; it drains between them (< 1% time)
    timeout: float = 45.0  # seconds a rank waits for a message or a silent peer before failing
    # seconds a collective may take (checkpoint barriers on slow storage, rank 0 profiling or
    # choosing the horizon while the others wait): the process groups' timeout
    collective_timeout: float = 1800.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, else gloo
    # fsdp: FSDP2 shards parameters, gradients and optimizer state over the D replicas
    sharding: Literal["none", "fsdp"] = "none"
    # fsdp under bf16-mixed: bfloat16 gathers parameters and accumulates gradients in bf16
    # (half the all-gather; shards and reduction stay float32)
    fsdp_param_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class RayConfig:
    """How ``mpc-dist ray`` runs the job on a Ray cluster (one Ray Train worker per rank)."""

    # PACK: pipelines on as few nodes as possible
    placement: Literal["PACK", "STRICT_PACK", "SPREAD"] = "PACK"
    cpus_per_worker: float = 1.0  # also the worker's torch threads
    use_gpu: bool | None = None  # None: one GPU per worker when the cluster has enough
    max_failures: int = 0  # restarts of the worker group after a failure (-1: unlimited)
    storage: str | None = None  # Ray's storage path or URI; a path also holds the run's files


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    horizon: HorizonConfig = field(default_factory=HorizonConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    ray: RayConfig = field(default_factory=RayConfig)

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
    if get_origin(kind) in (Union, UnionType):  # e.g. int | str: the first type that takes it
        for option in get_args(kind):
            try:
                return _coerce(where, value, option)
            except ConfigError:
                continue
        names = " or ".join(_name(k) for k in get_args(kind))
        raise ConfigError(f"{where}={value!r}: expected {names}")
    if get_origin(kind) is Literal:
        if value not in get_args(kind):
            fix = _HINTS.get(f"{where}={value}", f"use one of {', '.join(get_args(kind))}")
            raise ConfigError(f"{where}={value}: {fix}")
        return value
    if dataclasses.is_dataclass(kind):  # a nested section, e.g. model.lora
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping of {kind.__name__} fields")
        return _fill(where, kind(), value)
    if get_origin(kind) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping")
        return value
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


_HINTS = {  # a value users reach for that we refuse on purpose: why, and what instead
    "pipeline.sharding=zero1": "not offered (torch's ZeroRedundancyOptimizer cannot be "
    "checkpointed with DCP, DeepSpeed's ZeRO-1 takes over the step); use pipeline.sharding="
    "fsdp, which also shards parameters and gradients",
}


def _name(kind: Any) -> str:
    if get_origin(kind) is Literal:
        return " or ".join(repr(v) for v in get_args(kind))
    return getattr(kind, "__name__", str(kind))


def from_dict(raw: dict[str, Any]) -> Config:
    config = Config()
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping of sections")
    sections = {f.name for f in dataclasses.fields(Config)}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"{section}: unknown section; use one of {sorted(sections)}")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        _fill(section, getattr(config, section), values or {})
    return config


def _fill(where: str, target: Any, values: dict[str, Any]) -> Any:
    """Set ``target``'s fields from ``values``; unknown keys are errors."""
    hints = get_type_hints(type(target))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}.{key}: unknown key; {where} takes {sorted(hints)}")
        setattr(target, key, _coerce(f"{where}.{key}", value, hints[key]))
    return target


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
