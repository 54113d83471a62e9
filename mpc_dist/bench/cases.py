"""The bench's options (typed, built once from the command line) and its case matrix: which
systems, schedules, rules, horizons and modes run at every microbatch count."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from ..core import ComputeOptions

# --systems names -> torch.distributed.pipelining schedule classes (the rest: two stages per rank)
TORCH = {
    "1f1b": "Schedule1F1B",
    "gpipe": "ScheduleGPipe",
    "interleaved": "ScheduleInterleaved1F1B",
    "interleaved-zb": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
SYSTEMS = (*TORCH, "deepspeed")
# --block names of real blocks -> the timm model whose Block they are (at its real width)
TIMM_VITS = {"vit_b_16": "vit_base_patch16_224", "vit_l_16": "vit_large_patch16_224"}
BLOCKS = ("mlp", *TIMM_VITS)
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # --precision -> autocast dtype


@dataclass(frozen=True)
class BenchOptions:
    """``mpc-dist bench``'s options, in the order of its flags (``bench.json`` records them)."""

    stages: int = 8
    microbatches: tuple[int, ...] = ()  # m values; empty: P and 4P
    microbatch_size: int = 16
    width: int = 1024  # activation width (real tensors)
    real: bool = False  # real blocks (``block``) instead of emulated ones
    block: str = "mlp"  # real blocks: mlp (width x hidden) or a timm ViT's (TIMM_VITS)
    hidden: int = 2048  # real blocks: the MLP's hidden width
    tokens: int = 197  # ViT blocks: the sequence length (197: 224 px in 16 px patches + class)
    device: str = "cpu"  # cpu | cuda (a GPU per stage, NCCL) | auto (cuda for --real on GPUs)
    precision: str = "fp32"  # real blocks: fp32 | bf16 (autocast; states handed on in bf16)
    blocks_per_stage: int = 1
    cost_ms: float = 30.0  # emulated F = B = W per block
    latency_ms: float = 0.5  # simulator message latency (the bench measures its own)
    horizons: tuple[int, ...] = (1, 2, 3, 4)
    defer_horizons: tuple[int, ...] = (2,)  # also run these h with deferred weight gradients
    rules: tuple[str, ...] = ("receding", "shrinking")
    modes: tuple[str, ...] = ("sync", "async")
    systems: tuple[str, ...] = SYSTEMS  # baselines; "none": ours only
    steps: int = 4  # measured steps per case
    warmup: int = 1
    out: str = "runs/bench"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        """From the parsed flags, with the default microbatch counts (P and 4P) filled in."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        values["microbatches"] = values["microbatches"] or (args.stages, 4 * args.stages)
        return cls(**values)

    @property
    def blocks(self) -> int:
        """T: the blocks of our pipeline (``blocks_per_stage`` on each of P stages)."""
        return self.stages * self.blocks_per_stage

    @property
    def compute(self) -> ComputeOptions:
        """How real blocks compute: ``--precision`` as autocast on the bench's device."""
        device_type = "cuda" if self.device == "cuda" else "cpu"
        return ComputeOptions(PRECISIONS[self.precision], device_type=device_type)

    def rank_device(self) -> torch.device:
        """This rank's device (in a worker: its GPU was set before the process group)."""
        if self.device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


@dataclass(frozen=True)
class Case:
    system: str  # ours | torch | deepspeed
    name: str
    microbatches: int
    rule: str = "receding"
    horizon: int = 0  # 0: back-propagation (h = P)
    mode: str = "sync"
    policy: str = "horizon"  # ours: 1f1b | gpipe | horizon; torch: the schedule class
    defer: bool = False  # ours: weight gradients deferred (W actions)


def cases(options: BenchOptions) -> list[Case]:
    """At every m: the torch schedules asked for, our BP schedules, our horizon schedules (rules
    x horizons x modes, some also with deferred weight gradients), DeepSpeed."""
    out = []
    for m in options.microbatches:
        torch = [s for s in options.systems if s in TORCH]
        out += [Case("torch", f"torch {TORCH[s]}", m, policy=TORCH[s]) for s in torch]
        out += [
            Case("ours", "ours BP-1F1B", m, policy="1f1b"),
            Case("ours", "ours BP-1F1B +W", m, policy="1f1b", defer=True),
            Case("ours", "ours BP-GPipe", m, policy="gpipe"),
        ]
        out += _horizon_cases(options, m)
        if "deepspeed" in options.systems:
            out.append(Case("deepspeed", "DeepSpeed PipelineEngine (1F1B)", m, policy="1f1b"))
    return out


def _horizon_cases(options: BenchOptions, m: int) -> list[Case]:
    out = []
    for mode in options.modes:
        for rule in options.rules:
            for h in options.horizons:
                if h >= options.blocks or (rule == "shrinking" and h == 1):  # BP, receding 1
                    continue
                name = f"ours {rule} h={h} {mode}"
                out.append(Case("ours", name, m, rule, h, mode))
                if h in options.defer_horizons and rule == "receding":
                    out.append(Case("ours", f"{name} +W", m, rule, h, mode, defer=True))
    return out
