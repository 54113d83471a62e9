"""The composability matrix: every pair of features (and the combinations users run) either trains
exactly like one process without them or is refused by config validation in one line.

A cell is a set of features, each a handful of config values over a tiny float64 base config.
``validate_config`` decides whether a cell runs; a refused cell must be refused in one line that
begins with a field the cell sets. Every cell that runs is trained for three minibatches as a
2-stage pipeline (2 x 2 with fsdp; spawned gloo groups per layout run the cells, ``PARTS``) and
compared, on every rank, with one process training the same model eagerly, one engine per
replica (a block-local rule draws its noise per replica). docs/composability.md is the table;
write it with

    python tests/test_composability.py --write-doc

and ``test_every_cell_has_a_verdict_in_the_table`` fails when it is stale.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: helpers next to this file

from processes import run  # noqa: E402

from mpc_dist.config import Config, ConfigError, from_dict  # noqa: E402
from mpc_dist.core import ComputeOptions, EngineOptions, Plan  # noqa: E402
from mpc_dist.core.compile import CompileStats, is_compiled  # noqa: E402
from mpc_dist.data import Loader, Shard, mixes, open_source  # noqa: E402
from mpc_dist.devices import dtype_of  # noqa: E402
from mpc_dist.models import build_model, instantiate  # noqa: E402
from mpc_dist.parallel import Groups, RuntimeOptions, Topology, stage_ranges  # noqa: E402
from mpc_dist.rules import make_engine  # noqa: E402
from mpc_dist.train import OptimizerStep, build_optimizer, build_stage  # noqa: E402
from mpc_dist.train.precision import AUTOCAST, compute_options, grad_scaler  # noqa: E402
from mpc_dist.train.stage import schedule_spec  # noqa: E402
from mpc_dist.train.validate import validate_config  # noqa: E402

DOC = Path(__file__).parents[1] / "docs" / "composability.md"
STAGES, STEPS, SHAPE, CLASSES = 2, 3, (1, 28, 28), 10
BASE = {  # float64, 4 blocks over 2 stages, receding h = 2: streams cross the stage boundary
    "model": {"name": "residual_mlp", "num_blocks": 4, "width": 8, "hidden": 12, "head": "aux"},
    "horizon": {"rule": "receding", "horizon": 2},
    "data": {"dataset": "synthetic", "batch_size": 8, "num_microbatches": 2},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},  # Adam would magnify rounding
    "train": {"dtype": "float64"},
    "pipeline": {"stages": STAGES, "replicas": 1},
}
IMAGES = "<images>"  # an image folder (tests/data_helpers.py exports one per test run)
MIXED = {"train.dtype": "float32"}  # mixed precision keeps float32 master weights
FEATURES: dict[str, dict[str, object]] = {
    "fsdp": {"pipeline.sharding": "fsdp", "pipeline.replicas": 2},  # over 2 replicas
    "bf16": {"train.precision": "bf16-mixed", **MIXED},
    "fp16": {"train.precision": "fp16-mixed", **MIXED},
    "checkpointing": {"train.activation_checkpointing": "blocks"},
    # aot_eager: dynamo's graphs through AOTAutograd, without inductor's code generation
    # (tests/test_compile.py runs inductor); the same graphs the engine splits and retains
    "compile": {"train.compile": "blocks", "train.compile_backend": "aot_eager"},
    "deferral": {"pipeline.defer_weights": True},
    "lora": {"model.lora": {"rank": 2, "alpha": 4.0, "targets": ["fc1"]}},
    "async": {"pipeline.mode": "async"},
    # the streaming data path: images read from disk by the Loader, augmented by timm and mixed
    # into soft targets that travel down the pipeline with the activations (in-process decoding:
    # a worker process is a fresh interpreter here, and tests/test_data_loader.py shows workers
    # give the same tensors)
    "loader": {
        "data.dataset": "folder",
        "data.root": IMAGES,
        "data.image_size": 12,
        "data.num_workers": 0,
        "augment.enabled": True,
        "augment.auto_augment": "rand-m9-mstd0.5-inc1",
        "augment.re_prob": 0.25,
        "augment.mixup": 0.8,
        "augment.cutmix": 1.0,
        "augment.label_smoothing": 0.1,
    },
    # the rule families besides the horizon rules (receding above)
    "ff": {"horizon.rule": "ff", "horizon.horizon": 1, "model.head": "shared"},
    "forward_gradient": {"horizon.rule": "forward_gradient", "horizon.horizon": 1},
    "pepita": {
        "horizon.rule": "pepita",
        "horizon.horizon": 1,
        "model.name": "relu_mlp",
        "model.head": "shared",
    },
}
EXCLUSIVE = (("bf16", "fp16"), ("ff", "forward_gradient", "pepita"))  # one value of a field
COMBINATIONS = (  # what users run together, beyond pairs
    ("fsdp", "bf16", "checkpointing", "compile"),
    ("fsdp", "bf16", "checkpointing", "lora"),
    ("async", "deferral", "compile"),
    ("compile", "checkpointing", "deferral"),
    ("fsdp", "async", "compile"),
    ("lora", "bf16", "compile"),
    ("fp16", "fsdp", "checkpointing"),
    ("ff", "fsdp", "compile"),
    ("ff", "async", "checkpointing"),
    ("loader", "fsdp", "bf16", "compile"),
    ("loader", "async", "deferral", "checkpointing"),
)
FLOAT64_ATOL = 1e-9  # float64: only the order of summation differs
MIXED_RTOL = 1e-5  # against one process in the same precision: reduction order, in float32
FP32_RTOL = 0.05  # and the weights' distance from an fp32 run, relative to their size


def cells() -> list[tuple[str, ...]]:
    """Each feature alone, every pair of compatible features, and COMBINATIONS."""
    names = list(FEATURES)
    pairs = [
        pair
        for pair in itertools.combinations(names, 2)
        if not any(set(pair) <= set(group) for group in EXCLUSIVE)
    ]
    return [(name,) for name in names] + pairs + list(COMBINATIONS)


_IMAGES: list[str] = []  # the exported image folder of this process (spawned ranks are handed it)


def images_root() -> str:
    if not _IMAGES:
        from data_helpers import exported

        _IMAGES.append(str(exported("folder")))
    return _IMAGES[0]


def cell_config(cell: tuple[str, ...]) -> Config:
    raw = {section: dict(values) for section, values in BASE.items()}
    for feature in cell:
        for key, value in FEATURES[feature].items():
            section, name = key.split(".")
            raw.setdefault(section, {})[name] = images_root() if value == IMAGES else value
    return from_dict(raw)


def refusal(cell: tuple[str, ...]) -> str | None:
    """Config validation's one-line refusal of ``cell``, or None if the cell runs."""
    try:
        validate_config(cell_config(cell))
    except ConfigError as error:
        return str(error)
    return None


def tolerance(cell: tuple[str, ...]) -> str:
    if {"bf16", "fp16"} & set(cell):
        return (
            f"= one process in its precision (rtol {MIXED_RTOL:g}); within {FP32_RTOL:g} of fp32 "
            f"taking the same steps"
        )
    return f"= one process, float64 (atol {FLOAT64_ATOL:g})"


# ----------------------------------------------------------------------------- refused cells


def test_refused_cells_are_refused_in_one_line_naming_a_field_they_set():
    refused = {cell: message for cell in cells() if (message := refusal(cell)) is not None}
    assert refused, "no cell is refused: check that validation runs"
    for cell, message in refused.items():
        keys = {key for feature in cell for key in FEATURES[feature]} | {"horizon.rule"}
        assert "\n" not in message, (cell, message)
        field = message.split("=")[0].split(":")[0].split("/")[0]
        assert field in keys, f"{cell}: the refusal names {field}, not a field the cell sets"


def test_every_cell_has_a_verdict_in_the_table():
    assert len(cells()) == len(set(cells())), "a cell is listed twice"
    assert DOC.read_text() == table(), (
        "docs/composability.md is out of date: python tests/test_composability.py --write-doc"
    )


# ----------------------------------------------------------------------------- cells that run


def streams(config: Config) -> bool:
    return config.data.dataset == "folder"


def input_shape(config: Config) -> tuple[int, ...]:
    return open_source(config.data, "train").input_shape if streams(config) else SHAPE


def batches(config: Config, replica: int, inputs: bool = True) -> list[tuple]:
    """The first STEPS minibatches as ``replica`` reads them: its rows of random tensors, or
    the Loader's images (mixed per global microbatch; (None, None) without inputs)."""
    d, replicas = config.data, config.pipeline.replicas
    if streams(config):
        source = open_source(d, "train", config.train.seed)
        shard = Shard(replica, replicas, inputs)
        loader = Loader(
            source, d, config.augment, "train", config.train.seed, shard, d.num_microbatches
        )
        epoch = loader.epoch(0)
        return [next(epoch) for _ in range(STEPS)]
    g = torch.Generator().manual_seed(7)
    dtype, n = dtype_of(config.train.dtype), d.batch_size
    mine = slice(replica * n // replicas, (replica + 1) * n // replicas)
    return [
        (
            torch.randn(n, *SHAPE, dtype=torch.float64, generator=g).to(dtype)[mine],
            torch.randint(0, CLASSES, (n,), generator=g)[mine],
        )
        for _ in range(STEPS)
    ]


def one_process(
    config: Config, precision: str | None = None, skip: tuple[int, ...] = ()
) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """The weights after eager training in one process (no sharding, checkpointing, compiling or
    deferral; one engine per replica over the same model, each on its replica's share), and the
    steps an fp16 loss scale skipped. Steps in ``skip`` are not taken (an fp32 run that follows
    an fp16 one)."""
    t, d = config.train, config.data
    precision = precision or t.precision
    dtype = dtype_of(t.dtype)
    meta = build_model(config.model, input_shape(config), CLASSES, device="meta")
    model = instantiate(meta, "cpu", dtype, t.seed, None, config.model.lora)
    compute = ComputeOptions(autocast_dtype=AUTOCAST[precision])
    scaler = grad_scaler(compute, torch.device("cpu"))
    step = OptimizerStep(build_optimizer(config.optim, model.parameters()), scaler=scaler)
    options = EngineOptions(compute, track_memory=False, scale_loss=step.scale_loss, seed=t.seed)
    plan = Plan(config.horizon.rule, config.horizon.horizon, meta.num_blocks)
    engines = [make_engine(model, plan, options) for _ in range(config.pipeline.replicas)]
    replicas, m, skipped = config.pipeline.replicas, d.num_microbatches, []
    data = [batches(config, r) for r in range(replicas)]
    for n in range(STEPS):
        for r, engine in enumerate(engines):
            x, y = data[r][n]
            y = y.to(dtype) if y.is_floating_point() else y  # soft targets, as the runtime does
            for xs, ys in zip(x.to(dtype).chunk(m), y.chunk(m), strict=True):
                engine.train_microbatch(xs, ys, 1 / (m * replicas))
        scale = scaler.get_scale() if scaler is not None else None
        if n in skip:
            model.zero_grad(set_to_none=True)
            continue
        step(torch.zeros(()), config.optim.lr)
        if scaler is not None and scaler.get_scale() < scale:  # overflow: the step was skipped
            skipped.append(n)
    return {name: p.detach() for name, p in model.named_parameters()}, tuple(skipped)


def references(cell: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """What a cell's pipeline must equal: one process in its precision, and (mixed precision)
    one process in fp32 taking the same steps."""
    config = cell_config(cell)
    same, skipped = one_process(config)
    if config.train.precision == "fp32":
        return {"same": same}
    assert len(skipped) < STEPS, f"{cell}: fp16 skipped every step, nothing is compared"
    return {"same": same, "fp32": one_process(config, "fp32", skipped)[0]}


def pipelined(config: Config, groups: Groups) -> tuple[dict[str, torch.Tensor], list]:
    """This rank's weights after training as configured; compile counts per runtime call."""
    t, topology = config.train, groups.topology
    meta = build_model(config.model, input_shape(config), CLASSES, device="meta")
    counts = [meta.num_blocks // STAGES] * STAGES
    runtime = RuntimeOptions(
        schedule=schedule_spec(config), dtype=dtype_of(t.dtype), soft_targets=mixes(config.augment)
    )
    stage = build_stage(
        model=meta,
        plan=Plan(config.horizon.rule, config.horizon.horizon, meta.num_blocks),
        ranges=stage_ranges(counts),
        groups=groups,
        optim=config.optim,
        runtime=runtime,
        compute=compute_options(t, torch.device("cpu")),
        seed=t.seed,
        spec=config.model,
        sharding=config.pipeline.sharding,
    )
    mine = batches(config, topology.replica, inputs=topology.stage == 0)
    calls = [[b] for b in mine]  # sync: one minibatch per call
    if config.pipeline.mode == "async":  # a window of two minibatches, then the third
        calls = [mine[:2], mine[2:]]
    compiled = []
    for call in calls:
        before = CompileStats.now()
        share = config.data.batch_size // topology.replicas
        stage.runtime.run(call, [config.optim.lr] * len(call), batch_size=share)
        compiled.append(CompileStats.now().since(before))
    if t.compile == "blocks":
        assert all(is_compiled(block) for block in stage.model.blocks.values())
    weights = {}
    for name, p in stage.model.named_parameters():
        weights[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
    return weights, compiled


def check_cells(rank: int, world: int, runnable: list[tuple[str, ...]], images: str) -> None:
    _IMAGES[:] = [images]
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never fall back to eager silently
    torch._dynamo.config.recompile_limit = 64  # many model variants in one process
    groups = Groups.create(Topology(STAGES, world // STAGES, rank))
    patient = dist.new_group(timeout=timedelta(minutes=10))  # ranks' references take unequal time
    for first in range(0, len(runnable), world):  # each rank computes one cell's references
        batch = runnable[first : first + world]
        gathered: list = [None] * world
        mine = references(batch[rank]) if rank < len(batch) else None
        dist.all_gather_object(gathered, mine, group=patient)
        for cell, expected in zip(batch, gathered, strict=False):
            check_cell(cell, groups, expected)
            dist.barrier(group=patient)


def check_cell(cell: tuple[str, ...], groups: Groups, expected: dict) -> None:
    config = cell_config(cell)
    got, compiled = pipelined(config, groups)
    for name, weight in got.items():
        where = f"{'+'.join(cell)} rank {groups.topology.rank} {name}"
        if config.train.precision == "fp32":
            torch.testing.assert_close(
                weight,
                expected["same"][name],
                rtol=0,
                atol=FLOAT64_ATOL,
                msg=lambda e, w=where: f"{w}: {e}",
            )
            continue
        torch.testing.assert_close(
            weight,
            expected["same"][name],
            rtol=MIXED_RTOL,
            atol=1e-7,
            msg=lambda e, w=where: f"{w}: {e}",
        )
        error, size = (weight - expected["fp32"][name]).norm(), expected["fp32"][name].norm()
        assert error <= FP32_RTOL * size, f"{where}: {float(error)} from fp32's ({float(size)})"
    if config.train.compile == "blocks":  # graphs are compiled in the first call only
        assert all(c.graphs == 0 and c.graph_breaks == 0 for c in compiled[1:]), (cell, compiled)


def part(cell: tuple[str, ...]) -> str:
    """Which spawned group checks a cell: its layout, and compiled or reading images (the slow
    ones: compiling a model, a first timm import) apart from the rest."""
    layout = "P=2 x D=2" if cell_config(cell).pipeline.replicas == 2 else "P=2"
    kind = "compile" if "compile" in cell else "loader" if "loader" in cell else "eager"
    return f"{layout}, {kind}"


PARTS = [f"{layout}, {kind}" for layout in ("P=2", "P=2 x D=2") for kind in ("eager", "compile",
         "loader")]  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize("which", PARTS)
def test_cells_that_run_equal_one_process(which):
    """The cells that run, one spawned group per part: fsdp's over 2 replicas."""
    runnable = [cell for cell in cells() if refusal(cell) is None]
    assert len(runnable) >= len(cells()) // 2, "most cells should run"
    mine = [cell for cell in runnable if part(cell) == which]
    assert mine, f"no cell in {which}"
    run(check_cells, STAGES * (2 if "D=2" in which else 1), mine, images_root(), timeout=540)


# ----------------------------------------------------------------------------- the table


def table() -> str:
    """docs/composability.md, from ``cells()`` and config validation: the pairs as a grid, the
    refusals they cite, the combinations."""
    verdicts = {cell: refusal(cell) for cell in cells()}
    reasons = list(dict.fromkeys(m for m in verdicts.values() if m is not None))

    def mark(cell: tuple[str, ...]) -> str:
        message = verdicts[cell]
        return "✓" if message is None else f"✗ {reasons.index(message) + 1}"

    names = list(FEATURES)
    lines = [
        "# Composability: which features work together",
        "",
        *textwrap.wrap(
            "Generated by `python tests/test_composability.py --write-doc` from the cells of "
            "`tests/test_composability.py`; CI fails when this file is stale. Each cell is a set "
            "of features over a tiny config (residual MLP, 4 blocks, receding h = 2, float64, "
            "SGD with momentum).", 96,
        ),
        "",
        *textwrap.wrap(
            "* **✓**: trained for 3 minibatches as 2 pipeline stages (fsdp: x 2 data-parallel "
            "replicas; a spawned gloo group per layout runs its compiled cells, another its "
            "cells reading images, a third the rest), every rank's weights "
            "equal one process training eagerly (no sharding, checkpointing, compiling or "
            "deferral; one engine per replica, reading what the replica reads: the loader cells "
            f"stream the same images through the Loader): in float64 within atol "
            f"{FLOAT64_ATOL:g}; with "
            f"bf16 or fp16, one process in the same precision within rtol {MIXED_RTOL:g}, and an "
            f"fp32 run taking the same steps within {FP32_RTOL:g} of the weights' norm. A "
            "compiled cell compiles nothing after its first training call.", 96,
            subsequent_indent="  ",
        ),
        "* **✗ n**: refused by config validation before any process starts, with refusal n.",
        "* **—**: one field, two values (not a combination).",
        "",
        "| feature | config |",
        "| --- | --- |",
        *(f"| {name} | {', '.join(f'`{k}: {v}`' for k, v in values.items())} |"
          for name, values in FEATURES.items()),
        "",
        "## Pairs (the diagonal: the feature alone)",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- " * (len(names) + 1) + "|",
    ]  # fmt: skip
    for i, row in enumerate(names):
        marks = []
        for j, column in enumerate(names):
            pair = (row,) if i == j else tuple(sorted((row, column), key=names.index))
            marks.append(mark(pair) if pair in verdicts else "—")
        lines.append(f"| **{row}** | " + " | ".join(marks) + " |")
    lines += ["", "## Combinations", ""]
    lines += [f"* {' + '.join(cell)}: {mark(cell)}" for cell in COMBINATIONS]
    lines += ["", "## Refusals", ""]
    lines += [f"{n}. {message}" for n, message in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-doc"]:
        sys.exit("usage: python tests/test_composability.py --write-doc")
    DOC.write_text(table())
    print(f"wrote {DOC}")
