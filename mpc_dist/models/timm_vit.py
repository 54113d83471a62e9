"""timm's Vision Transformers (``model.name: timm/vit_base_patch16_224`` and the like): patch
embedding + tokens + position as the stem, ``blocks`` as the blocks, the final norm + pooling +
classifier as the head. Pretrained timm checkpoints load with their own tensor names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import BlockModel, ModelError, assemble

PREFIX = "timm/"


class TimmViTStem(nn.Module):
    """Patch embedding, class / register tokens and position embedding of a timm ViT; inputs
    of another size are resized to the one the model was built for."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        for name in (
            "patch_embed",
            "cls_token",
            "reg_token",
            "pos_embed",
            "pos_drop",
            "patch_drop",
            "norm_pre",
        ):
            setattr(self, name, getattr(vit, name))
        for name in ("no_embed_class", "num_prefix_tokens", "dynamic_img_size"):
            setattr(self, name, getattr(vit, name))
        self.image_size = tuple(vit.patch_embed.img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.vision_transformer import VisionTransformer

        if tuple(x.shape[-2:]) != self.image_size and not self.dynamic_img_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear")
        x = VisionTransformer._pos_embed(self, self.patch_embed(x))  # timm's own, on our fields
        return self.norm_pre(self.patch_drop(x))

    def init_weights(self) -> None:
        """timm's ``init_weights`` for the tokens (the patch embedding resets itself)."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)


class TimmViTHead(nn.Module):
    """Final norm, pooling (class token or average), fc norm and classifier of a timm ViT."""

    def __init__(self, norm: nn.Module, head: nn.Module, vit: nn.Module, fc_norm=None) -> None:
        super().__init__()
        self.norm, self.fc_norm, self.head = norm, fc_norm or nn.Identity(), head
        self.head_drop = vit.head_drop
        self.attn_pool = getattr(vit, "attn_pool", None)
        self.global_pool, self.num_prefix_tokens = vit.global_pool, vit.num_prefix_tokens
        self.pool_include_prefix = getattr(vit, "pool_include_prefix", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer.forward_head(self, self.norm(x))

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer.pool(self, x, pool_type)


def build_timm_vit(spec: ModelConfig, input_shape, num_classes: int) -> BlockModel:
    import timm

    name = spec.name.removeprefix(PREFIX)
    image_size = spec.image_size or input_shape[1]
    try:
        vit = timm.create_model(
            name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=input_shape[0],
            img_size=image_size,
            **(spec.kwargs or {}),
        )
    except (RuntimeError, TypeError) as error:  # timm: "Unknown model (...)", a bad argument
        raise ModelError(f"model.name={spec.name}: {error}") from None
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise ModelError(f"model.name={spec.name}: not a timm Vision Transformer")
    stem = TimmViTStem(vit)
    head = TimmViTHead(vit.norm, vit.head, vit, vit.fc_norm)
    width = vit.embed_dim

    def make_aux(shape: tuple[int, ...]) -> nn.Module:
        return TimmViTHead(nn.LayerNorm(width), nn.Linear(width, num_classes), vit)

    return assemble(
        spec, stem, list(vit.blocks), head, input_shape, make_aux, _init_module, _weight_name
    )


def _init_module(name: str, module: nn.Module) -> bool:
    """timm's ``init_weights_vit_timm`` (linear layers truncated-normal, std 0.02)."""
    from timm.models.vision_transformer import init_weights_vit_timm

    if isinstance(module, nn.Linear) or hasattr(module, "init_weights"):
        init_weights_vit_timm(module, name)
        return True
    return False


def _weight_name(key: str) -> str | None:
    """timm's names (``blocks.3.attn.qkv.weight``, ``cls_token``, ``head.weight``) to ours."""
    if key.startswith("blocks."):
        return key
    if key.startswith(("norm.", "fc_norm.", "head.", "attn_pool.")):
        return "head." + key
    return "stem." + key
