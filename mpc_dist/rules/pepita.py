"""PEPITA (Dellaferrera & Kreiman 2022; Srinivasan et al. 2024): two forward passes, no backward
pass. The first pass gives the output error e = softmax(y_hat) - onehot(y); the last stage sends
e to the first (the one top-down message per microbatch), which feeds the input modulated by a
fixed random feedback matrix F, x_err = x + F e, through a second pass. Each layer learns from
the difference of its two activations, dW_l = (h_l - h_l_err) (h_{l-1}_err)^T (the first layer
with x_err), the output layer from the modulated error, dW_L = e_err (h_{L-1}_err)^T; biases
likewise. F ~ U[-1, 1] x 0.05 sqrt(6 / d_in), the original code's scale.

The options (``rules.pepita_*``) are the papers' stabilisers: dropout of hidden units with one
mask for both passes (both codes: 0.1), each hidden layer's output scaled to unit RMS per sample
(activation normalisation), and weight mirroring: F = B_0 B_1 ... B_L, each factor B_l (shaped
like W_l^T) moved towards its layer's mirror estimate, x^T f_l(x) / (n sigma^2) for noise x ~
N(0, sigma^2) through the layer f_l (Srinivasan et al.'s signs: -W_0^T for the first layer,
+W_l^T above, so that F follows -(W_L ... W_0)^T), and F rescaled to the fixed F's standard
deviation: mirroring chooses its direction, not its size. The mirror factors are buffers of the
layers they mirror (checkpointed with them); mirroring needs every layer on one stage.

Blocks are single linear layers with their nonlinearity (``model.name: relu_mlp``), the head
one linear layer. The engine implements the contract's ``forward``, ``second_pass`` and ``infer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, RulesConfig
from ..core import Engine, EngineOptions, ForwardResult, Plan
from ..models import BlockModel
from .common import EPS, add_linear_grads, draws, hooked, loss_factor
from .forward_gradient import linear_layers

MIRROR_NOISE = 0.1  # sigma of the mirroring noise (Srinivasan et al.'s code)
MIRROR_BUFFER = "pepita_mirror"


def check_pepita(model: BlockModel, options: RulesConfig | None = None, stages: int = 1) -> None:
    """One linear layer per block, a linear head, sane options; one line naming the field and
    the fix."""
    options = options or RulesConfig()
    for t in model.block_indices:
        layers = linear_layers(model, t)
        covered = {id(p) for layer in layers for p in layer.parameters()}
        blocks = [model.blocks[str(t)]] + ([model.stem] if t == 0 else [])
        if len(layers) != 1 or any(id(p) not in covered for b in blocks for p in b.parameters()):
            raise ConfigError(
                f"horizon.rule=pepita: block {t} is not one linear layer and its nonlinearity; "
                f"use model.name=relu_mlp"
            )
    if model.head is not None and not isinstance(model.head, nn.Linear):
        raise ConfigError(
            "horizon.rule=pepita: the head is not one linear layer; use model.name=relu_mlp"
        )
    if not 0 <= options.pepita_dropout < 1:
        raise ConfigError(f"rules.pepita_dropout={options.pepita_dropout}: must be in [0, 1)")
    if options.pepita_feedback_scale <= 0:
        raise ConfigError(f"rules.pepita_feedback_scale={options.pepita_feedback_scale}: > 0")
    if not 0 <= options.pepita_mirror_lr <= 1:
        raise ConfigError(f"rules.pepita_mirror_lr={options.pepita_mirror_lr}: must be in [0, 1]")
    if options.pepita_mirror_lr > 0 and stages > 1:
        raise ConfigError(
            f"rules.pepita_mirror_lr={options.pepita_mirror_lr}: weight mirroring forms F from "
            f"every layer's mirror, which one stage must hold; set pipeline.stages=1 or "
            f"rules.pepita_mirror_lr=0"
        )


def feedback_matrix(seed: int, inputs: int, classes: int, scale: float = 0.05) -> torch.Tensor:
    """The fixed F (inputs x classes), the same on every layout."""
    limit = scale * math.sqrt(6 / inputs)
    uniform = torch.rand(inputs, classes, generator=draws(seed, -2, 0), dtype=torch.float64)
    return (2 * uniform - 1) * limit


def normalise_rms(h: torch.Tensor) -> torch.Tensor:
    return h / h.square().mean(dim=-1, keepdim=True).add(EPS).sqrt()


@dataclass
class _Held:
    """A microbatch between its two passes."""

    outputs: list = field(default_factory=list)  # h_l of the first pass (handles: ``.tensor``)
    masks: list = field(default_factory=list)  # the dropout masks, for the second pass
    inputs: torch.Tensor | None = None  # x (first stage)
    targets: torch.Tensor | None = None  # y (last stage)
    scale: float = 1.0


class PepitaEngine(Engine):
    def __init__(self, model: BlockModel, plan: Plan, options: EngineOptions | None = None) -> None:
        rules = (options.rules if options is not None else None) or RulesConfig()
        check_pepita(model, rules)
        super().__init__(model, plan, options)
        self.rules, seed = rules, self.options.seed
        if rules.pepita_mirror_lr > 0 and not (self.first == 0 and self.is_last):
            check_pepita(model, rules, stages=2)  # raises: mirroring needs every layer
        self.feedback = None
        if self.first == 0:
            d_in = math.prod(model.input_shape)
            param = next(model.parameters())
            scale = self.rules.pepita_feedback_scale
            fixed = feedback_matrix(seed, d_in, model.num_classes, scale)
            self.feedback = fixed.to(param.device, param.dtype)
            if self.rules.pepita_mirror_lr > 0:
                self._add_mirrors(float(fixed.std()))
        self._held: dict[int, _Held] = {}
        self._forwards = dict.fromkeys(range(-3, self.last), 0)  # -3: mirroring noise

    def _layers(self) -> list[nn.Module]:
        """The mirrored layers, input to output: each block's linear layer, then the head."""
        return [linear_layers(self.model, t)[0] for t in range(self.first, self.last)] + [
            self.model.head
        ]

    def _add_mirrors(self, std: float) -> None:
        """B_l ~ N(0, s^2), s chosen so that B_0 ... B_L has F's standard deviation."""
        layers = self._layers()
        inner = math.prod(layer.out_features for layer in layers[:-1])
        s = (std**2 / inner) ** (1 / (2 * len(layers)))
        self.target_std = std
        for k, layer in enumerate(layers):
            if not hasattr(layer, MIRROR_BUFFER):
                g = draws(self.options.seed, -4, k)
                shape = (layer.in_features, layer.out_features)
                b = torch.randn(shape, generator=g, dtype=torch.float64) * s
                layer.register_buffer(MIRROR_BUFFER, b.to(layer.weight.device, layer.weight.dtype))

    def _feedback(self) -> torch.Tensor:
        if self.rules.pepita_mirror_lr == 0:
            return self.feedback
        product = None
        for layer in reversed(self._layers()):
            b = getattr(layer, MIRROR_BUFFER)
            product = b if product is None else b @ product
        return product * (self.target_std / product.std().clamp_min(EPS))

    def _after(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """A hidden layer's output: dropped out, then normalised (as the options say)."""
        if mask is not None:
            h = h * mask
        return normalise_rms(h) if self.rules.pepita_normalise else h

    def _mask(self, t: int, like: torch.Tensor) -> torch.Tensor | None:
        rate = self.rules.pepita_dropout
        if rate == 0:
            return None
        k = self._forwards[t]
        self._forwards[t] += 1
        draw = draws(self.options.seed, t, k)
        keep = torch.rand(like.shape, generator=draw, dtype=torch.float64) >= rate
        return (keep.to(like.dtype) / (1 - rate)).to(like.device)

    @torch.no_grad()
    def forward(
        self,
        microbatch: int,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_scale: float = 1.0,
        eager: bool = True,
    ) -> ForwardResult:
        """The first pass; on the last stage, the error it sends to the first."""
        scale = loss_factor(self.options.scale_loss, loss_scale, inputs.device)
        held = self._held[microbatch] = _Held(scale=scale)
        held.inputs = inputs if self.first == 0 else None
        x = inputs
        with self.compute.autocast():
            for t in range(self.first, self.last):
                h = self.model.block_forward(t, x)
                mask = self._mask(t, h)
                x = self._after(h, mask)
                held.outputs.append(self.hold(x))
                held.masks.append(mask)
        if not self.is_last:
            return ForwardResult(x, None, {}, {})
        held.targets = targets
        logits = self.model.head(x)
        error = logits.softmax(-1) - F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
        loss = F.cross_entropy(logits.float(), targets) * loss_scale
        result = ForwardResult(None, logits, {self.plan.num_blocks: loss}, {}, top_down=error)
        if eager and self.first == 0:
            self.second_pass(microbatch, error)
        return result

    @torch.no_grad()
    def second_pass(self, microbatch: int, message: torch.Tensor) -> torch.Tensor | None:
        """The modulated pass over this run, accumulating its updates into ``.grad``. The first
        stage gets the error e, the others the state x_err from below; returns the state for the
        stage above (None on the last)."""
        held = self._held.pop(microbatch)
        if self.first == 0:
            feedback = self._feedback()
            modulation = message.to(feedback.dtype) @ feedback.T
            x = held.inputs + modulation.view_as(held.inputs)
        else:
            x = message
        weight = held.scale / len(x)  # the update is a mean over the microbatch
        inputs: list[torch.Tensor] = []  # what each block's linear layer saw
        with self.compute.autocast():
            for t, h, mask in zip(
                range(self.first, self.last), held.outputs, held.masks, strict=True
            ):
                (layer,) = linear_layers(self.model, t)
                with hooked([layer], lambda module, i, o: inputs.append(i[0])):
                    modulated = self._after(self.model.block_forward(t, x), mask)
                add_linear_grads(layer, (h.tensor - modulated) * weight, inputs[-1])
                x = modulated
            if self.rules.pepita_mirror_lr > 0:
                self._mirror(len(x))
            if not self.is_last:
                return x
            logits = self.model.head(x)
            error = logits.softmax(-1) - F.one_hot(held.targets, logits.shape[-1]).to(logits.dtype)
            add_linear_grads(self.model.head, error * weight, x)
        return None

    def _mirror(self, samples: int) -> None:
        """Move every B_l towards its layer's mirror estimate (noise through the layer)."""
        rate, k = self.rules.pepita_mirror_lr, self._forwards[-3]
        self._forwards[-3] += 1
        layers = self._layers()
        for i, layer in enumerate(layers):
            b = getattr(layer, MIRROR_BUFFER)
            g = draws(self.options.seed, -3, k * len(layers) + i)
            noise = torch.randn(samples, layer.in_features, generator=g, dtype=torch.float64)
            noise = (noise * MIRROR_NOISE).to(b.device, b.dtype)
            out = layer(noise)
            out = out.softmax(-1) if layer is self.model.head else F.relu(out)
            estimate = noise.T @ out / (samples * MIRROR_NOISE**2)
            sign = -1.0 if i == 0 else 1.0
            b.mul_(1 - rate).add_(sign * rate * estimate)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        with self.compute.autocast():
            for t in range(self.first, self.last):
                x = self._after(self.model.block_forward(t, x), None)
            return self.model.head(x) if self.is_last else x

    @property
    def outstanding(self) -> int:
        return len(self._held)
