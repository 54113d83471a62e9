"""The model protocol: a stem, T blocks, a head, and optional per-loss-point auxiliary heads.

Blocks live in an ``nn.ModuleDict`` keyed by their global index, so parameter names
(``blocks.5.fc1.weight``) survive splitting a model into pipeline stages. The stem belongs to
block 0; on a stage that does not hold block 0 (or the head) those parts are ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import ConfigError, ModelConfig

HEAD_MODES = ("shared", "aux", "goodness")


class ModelError(ConfigError):
    """A model configuration that cannot be built; the message names the field and the fix."""


class GoodnessHead(nn.Module):
    """Scalable forward-forward's head on a feature map (C, H, W): a 1x1 convolution with one
    channel per class; the goodness of class k, its score, is the mean square of channel k."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, num_classes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).square().mean(dim=(-2, -1))


# Initialises one module (its own tensors; children come first) and says whether it did.
InitModule = Callable[[str, nn.Module], bool]
# Translates a tensor name of a pretrained file (timm, torchvision) to this model's, or None.
WeightNames = Callable[[str], str | None]


class BlockModel(nn.Module):
    def __init__(
        self,
        stem: nn.Module | None,
        blocks: dict[int, nn.Module],
        head: nn.Module | None,
        aux_heads: dict[int, nn.Module],
        num_blocks: int,
        head_mode: str,
        init_module: InitModule | None = None,
        weight_names: WeightNames | None = None,
        family: str = "",
    ) -> None:
        super().__init__()
        self.init_module, self.weight_names, self.family = init_module, weight_names, family
        self.stem = stem
        self.blocks = nn.ModuleDict({str(t): b for t, b in blocks.items()})
        self.head = head
        self.aux_heads = nn.ModuleDict({str(s): h for s, h in aux_heads.items()})
        self.num_blocks = num_blocks
        self.head_mode = head_mode
        self.input_shape: tuple[int, ...] = ()  # (C, H, W) of one sample
        self.state_shapes: list[tuple[int, ...]] = []  # shape of x(0) .. x(T), one sample
        self.num_classes = 0  # what the head predicts

    @property
    def block_indices(self) -> list[int]:
        return sorted(int(t) for t in self.blocks)

    def block_forward(self, t: int, x: torch.Tensor) -> torch.Tensor:
        if t == 0:
            x = self.stem(x)
        return self.blocks[str(t)](x)

    def block_parameters(self, t: int) -> list[nn.Parameter]:
        params = list(self.blocks[str(t)].parameters())
        if t == 0:
            params = list(self.stem.parameters()) + params
        return params

    def loss_head(self, s: int) -> tuple[nn.Module, bool]:
        """The head evaluated at loss point s, and whether l_s trains it.

        A shared head at s < T is read-only: it gets gradient from l_T alone (spec section 1).
        """
        if s == self.num_blocks:
            return self.head, True
        if self.head_mode in ("aux", "goodness"):
            return self.aux_heads[str(s)], True
        return self.head, False

    def owned_parameters(self) -> list[nn.Parameter]:
        """Parameters this part trains: a shared head's copy below the last block is read-only."""
        holds_last = self.num_blocks - 1 in self.block_indices
        return [
            p for name, p in self.named_parameters() if holds_last or not name.startswith("head.")
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.block_indices:
            x = self.block_forward(t, x)
        return self.head(x)

    def split(self, first: int, last: int, head_copy: bool = False) -> BlockModel:
        """The part holding blocks [first, last) with the modules it needs (shared, not copied).

        ``head_copy``: keep the shared head below the last block, for loss points s < T.
        """
        part = BlockModel(
            self.stem if first == 0 else None,
            {t: self.blocks[str(t)] for t in range(first, last)},
            self.head if last == self.num_blocks or head_copy else None,
            {s: h for s, h in self._aux_items() if first < s <= last},
            self.num_blocks,
            self.head_mode,
            self.init_module,
            self.weight_names,
            self.family,
        )
        part.input_shape, part.state_shapes = self.input_shape, self.state_shapes
        part.num_classes = self.num_classes
        return part

    def _aux_items(self) -> Iterator[tuple[int, nn.Module]]:
        return ((int(s), h) for s, h in self.aux_heads.items())


def pipeline_model(
    stem: nn.Module,
    blocks: list[nn.Module],
    head: nn.Module,
    input_shape: tuple[int, ...],
    aux_head: Callable[[tuple[int, ...]], nn.Module] | None = None,
    head_mode: str = "shared",
    init_module: InitModule | None = None,
    weight_names: WeightNames | None = None,
    name: str = "model",
) -> BlockModel:
    """Your modules as a pipeline model: x(0) = stem(input), x(t+1) = blocks[t](x(t)),
    prediction = head(x(T)).

    ``input_shape``: one sample's shape, e.g. (3, 224, 224). ``head_mode``: ``shared`` evaluates
    ``head`` at intermediate states too (they must have x(T)'s shape), ``aux`` gives loss point s
    its own ``aux_head(shape of x(s))``, ``goodness`` gives every loss point, T included, its own
    ``GoodnessHead`` (feature maps only; as many classes as ``head`` predicts).
    ``init_module(name, module)`` initialises a module's own tensors the family's way and returns
    True (else ``reset_parameters`` is used). ``weight_names`` maps names in a pretrained file to
    this model's. Called from a builder, the modules are built on the meta device and only a
    rank's part is ever allocated.
    """
    if head_mode not in HEAD_MODES:
        raise ModelError(f"model.head={head_mode!r}: unknown; use one of {HEAD_MODES}")
    T = len(blocks)
    shapes = state_shapes(stem, blocks, input_shape)
    if head_mode == "shared":
        for s in range(1, T):
            if shapes[s] != shapes[T]:
                raise ModelError(
                    f"model.head=shared: {name}'s state x({s}) has shape {shapes[s]} but the "
                    f"head takes {shapes[T]}; set model.head=aux"
                )
    if head_mode == "aux" and aux_head is None:
        raise ModelError(f"model.head=aux: {name} has no aux head factory; pass aux_head=")
    aux = {s: aux_head(shapes[s]) for s in range(1, T)} if head_mode == "aux" else {}
    classes = num_classes(head, shapes[T])
    if head_mode == "goodness":
        head, aux = _goodness_heads(classes, shapes, name)
    model = BlockModel(
        stem, dict(enumerate(blocks)), head, aux, T, head_mode, init_module, weight_names, name
    )
    model.input_shape, model.state_shapes = tuple(input_shape), shapes
    model.num_classes = classes
    return model


@torch.no_grad()
def num_classes(head: nn.Module, shape: tuple[int, ...]) -> int:
    """How many classes ``head`` predicts from a state of ``shape`` (a tiny forward pass)."""
    first = next(iter(head.parameters()), torch.zeros(()))
    mode = head.training
    probe = torch.zeros(1, *shape, device=first.device, dtype=first.dtype)
    classes = head.eval()(probe).shape[-1]
    head.train(mode)
    return classes


def _goodness_heads(classes: int, shapes: list[tuple[int, ...]], name: str):
    """The head at T and the aux heads below it, all goodness heads for ``classes``."""
    if any(len(shape) != 3 for shape in shapes[1:]):
        raise ModelError(
            f"model.head=goodness: {name}'s states are not feature maps (C, H, W); use a "
            f"convolutional model (resnet18) or model.head=aux"
        )
    T = len(shapes) - 1
    return GoodnessHead(shapes[T][0], classes), {
        s: GoodnessHead(shapes[s][0], classes) for s in range(1, T)
    }


def assemble(
    spec: ModelConfig,
    stem: nn.Module,
    blocks: list[nn.Module],
    head: nn.Module,
    input_shape: tuple[int, ...],
    make_aux_head: Callable[[tuple[int, ...]], nn.Module],
    init_module: InitModule | None = None,
    weight_names: WeightNames | None = None,
) -> BlockModel:
    """``pipeline_model`` with the head mode and name a config gives."""
    return pipeline_model(
        stem,
        blocks,
        head,
        input_shape,
        make_aux_head,
        spec.head,
        init_module,
        weight_names,
        spec.name,
    )


@torch.no_grad()
def state_shapes(stem: nn.Module, blocks: list[nn.Module], input_shape) -> list[tuple[int, ...]]:
    """Shapes of x(0) .. x(T) (without the batch dimension), from one tiny forward pass (on the
    meta device when the model is built there: no memory, no compute)."""
    modules = [stem, *blocks]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()  # keep batch-norm running statistics untouched
    first = next((p for m in modules for p in m.parameters()), torch.zeros(()))
    x = stem(torch.zeros(1, *input_shape, device=first.device, dtype=first.dtype))
    shapes = [tuple(x.shape[1:])]
    for block in blocks:
        x = block(x)
        shapes.append(tuple(x.shape[1:]))
    for m, mode in zip(modules, modes, strict=True):
        m.train(mode)
    return shapes
