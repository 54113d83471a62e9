"""From a structure on the meta device to this rank's weights: allocate only the part a rank
holds, initialise it the same way whatever the stage layout, load pretrained tensors, add LoRA.

Models are built on the ``meta`` device (no memory). ``materialize`` allocates a part and
initialises every module with a generator seeded by (seed, the module's global name), children
before parents, so a part of a P-stage layout gets exactly the weights the same modules have in
a single-process model. A module is initialised by its family's ``init_module`` (the model
family's own scheme) or else its ``reset_parameters``; a tensor no initialiser touched is an
error naming it.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, LoraConfig
from .base import BlockModel, ModelError


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


@contextlib.contextmanager
def seeded(seed: int, name: str, device: torch.device) -> Iterator[None]:
    """The global RNG, seeded by (seed, name) for the block's duration, then restored."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        yield


def materialize(model: BlockModel, device: torch.device | str, seed: int) -> BlockModel:
    """Allocate ``model`` (a whole model or a stage's part) on ``device`` and initialise it."""
    device = torch.device(device)
    model.to_empty(device=device)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
        for name, module in _post_order(model):
            with seeded(seed, name, device):
                _init(model, name, module)
    untouched = [
        n
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_floating_point() and torch.isnan(t).any()
    ]
    if untouched:
        raise ModelError(
            f"model.name: no initialiser set {untouched[:4]}; give their modules "
            f"reset_parameters() or pass init_module= to pipeline_model"
        )
    return model


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix.rstrip("."), module


def _init(model: BlockModel, name: str, module: nn.Module) -> None:
    if model.init_module is not None and model.init_module(name, module):
        return
    for method in ("reset_parameters", "_reset_parameters"):
        if callable(getattr(module, method, None)):
            getattr(module, method)()
            return


# ----------------------------------------------------------------------------- pretrained weights


def load_weights(model: BlockModel, path: str | Path) -> dict[str, list[str]]:
    """Copy this part's tensors from a safetensors or torch file (timm / torchvision names are
    translated by the family's ``weight_names``), reading only those tensors. Tensors whose
    shape differs (a classifier for other classes) are skipped and reported; a tensor of the
    part that the file lacks is an error, except heads (new classifiers are normal)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={path}: no such file; give a local .safetensors or .pt")
    wanted = model.state_dict()
    translate = model.weight_names or (lambda key: key)
    loaded, skipped = [], []
    with _tensors(path) as (keys, get):
        for key in keys:
            name = translate(key)
            if name not in wanted:
                continue
            value = get(key)
            if value.shape != wanted[name].shape:
                skipped.append(f"{name} {tuple(value.shape)} != {tuple(wanted[name].shape)}")
                continue
            with torch.no_grad():
                wanted[name].copy_(value)
            loaded.append(name)
    missing = [n for n in wanted if n not in loaded and not n.startswith(("head.", "aux_heads."))]
    if missing:
        raise ConfigError(
            f"model.weights={path}: lacks {len(missing)} tensors of this model, e.g. "
            f"{missing[:3]}; is it the weights of model.name={model.family}?"
        )
    return {"loaded": loaded, "skipped": skipped}


@contextlib.contextmanager
def _tensors(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as file:
            yield list(file.keys()), file.get_tensor
        return
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state = state.get("state_dict", state.get("model", state))
    yield list(state), state.__getitem__


# ----------------------------------------------------------------------------- LoRA


def add_lora(model: BlockModel, config: LoraConfig, seed: int) -> BlockModel:
    """LoRA adapters (peft) on the ``config.targets`` modules of every block; everything but the
    adapters and the heads is frozen. Adapters start as peft starts them (B = 0: the model is
    unchanged), A seeded by name so that every layout starts alike."""
    from peft import LoraConfig as PeftLora
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    peft_config = PeftLora(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.targets),
        lora_dropout=config.dropout,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        inject_adapter_in_model(peft_config, model.blocks)
    except ValueError as error:  # peft: "Target modules ... not found"
        raise ConfigError(f"model.lora.targets={config.targets}: {error}") from None
    device = next(model.parameters()).device
    for name, module in model.blocks.named_modules():
        if isinstance(module, LoraLayer):
            with seeded(seed, f"blocks.{name}", device):
                module.reset_lora_parameters("default", True)
    for module in (model.head, *model.aux_heads.values()):
        if module is not None:
            module.requires_grad_(True)
    return model


def instantiate(
    part: BlockModel,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
    weights: str | None = None,
    lora: LoraConfig | None = None,
) -> BlockModel:
    """A rank's part, ready to train: allocated and initialised (if built on meta), pretrained
    tensors loaded, LoRA added, in ``dtype`` on ``device``."""
    if is_meta(part):
        materialize(part, device, seed)
    if weights is not None:
        load_weights(part, weights)
    part = part.to(device, dtype)
    if lora is not None:
        add_lora(part, lora, seed)
    return part
