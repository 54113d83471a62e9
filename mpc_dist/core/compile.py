"""``train.compile: blocks``: each module an engine calls (the stem, every block, every head)
through ``torch.compile``, one small graph per module, compiled in place.

Each module's ``forward`` is replaced by its compiled self (``module.forward =
torch.compile(module.forward)``), not the module's call: parameter names and state dicts stay as
they are, FSDP2's and peft's hooks (which run in ``__call__``) stay outside the graph, so they
cause no graph break, and dynamo traces the module as it is at its first call (after the stage
was allocated, LoRA injected and sharded). Identical blocks
share one compiled graph: dynamo treats their parameters as graph inputs, so a ViT's twelve
encoder blocks compile once. The engine keeps calling ``model.block_forward``; everything it
builds around a block (detached leaves, streams of backward calls, the input-gradient /
weight-gradient split, activation checkpointing, autocast, saved-tensor hooks) works on the
compiled graph as on the eager one: ``tests/test_compile.py`` checks it equals eager.

``CompileStats`` reads dynamo's process-wide counters: graphs compiled, graph breaks and the
seconds spent compiling, for the metrics and the summary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import BlockModel

BACKENDS = ("inductor", "aot_eager")  # aot_eager: traced and partitioned, no code generation


def compile_blocks(model: BlockModel, backend: str) -> None:
    """Compile ``model``'s stem, blocks and heads in place with ``backend`` (modules already
    compiled are left as they are: an engine rebuilt for a new plan compiles nothing again)."""
    if backend not in BACKENDS:
        raise ValueError(f"compile backend {backend!r}: use one of {BACKENDS}")
    # The horizon engine runs several backward passes through one block's graph (one per
    # stream, retain_graph=True), which AOTAutograd's donated buffers forbid. The setting is
    # read at every compiled backward, so it is process-wide.
    torch._functorch.config.donated_buffer = False
    modules = [model.stem, *model.blocks.values(), model.head, *model.aux_heads.values()]
    for module in modules:
        if module is not None and not is_compiled(module):
            module.forward = torch.compile(module.forward, backend=backend)


def is_compiled(module: torch.nn.Module) -> bool:
    return "forward" in vars(module)


@dataclass(frozen=True)
class CompileStats:
    """dynamo's counts so far in this process (every compiled module, not only ours)."""

    graphs: int  # graphs compiled (a recompilation compiles one more)
    graph_breaks: int  # places a traced forward was split into several graphs
    seconds: float  # spent compiling forward and backward graphs

    @classmethod
    def now(cls) -> CompileStats:
        from torch._dynamo.utils import calculate_time_spent, counters

        return cls(
            graphs=int(counters["stats"]["unique_graphs"]),
            graph_breaks=int(sum(counters["graph_break"].values())),
            seconds=float(calculate_time_spent().get("total_wall_time", 0.0)),
        )

    def since(self, before: CompileStats) -> CompileStats:
        """What was compiled between ``before`` and this count."""
        return CompileStats(
            self.graphs - before.graphs,
            self.graph_breaks - before.graph_breaks,
            self.seconds - before.seconds,
        )

    def __add__(self, other: CompileStats) -> CompileStats:
        return CompileStats(
            self.graphs + other.graphs,
            self.graph_breaks + other.graph_breaks,
            self.seconds + other.seconds,
        )
