"""Learning rules as pipeline stage rules.

A rule says what a stage computes per microbatch and which messages it needs. The horizon rules
(``receding``, ``shrinking``) send activations forward and cotangents backward along the plan's
streams; the block-local rules (``ff``, ``sff``, ``forward_gradient``) train every block by its
own loss at its output, so their plan is h = 1's and no message goes backward: the schedule
generator, validator, simulator and runtime take that from the plan. The top-down rule
(``pepita``) has no streams: the last stage sends one message per microbatch to the first, and a
second forward pass (``G`` actions) carries the updates. ``make_engine`` gives the
engine a stage runs for its rule; the stage builder hands it to the runtime.
"""

from __future__ import annotations

from ..config import ConfigError, RulesConfig
from ..core import Engine, EngineOptions, HorizonEngine, Plan
from ..models import BlockModel
from .ff import ForwardForward, predict_by_goodness, relu_inputs
from .forward_gradient import ForwardGradient, perturbations
from .local import LocalEngine, LocalRule, LocalStep
from .pepita import PepitaEngine, check_pepita
from .sff import ScalableForwardForward, predict_by_average

HEADS = {"ff": ("shared",), "sff": ("goodness",), "forward_gradient": ("aux",)}


def local_rule(name: str, num_classes: int, options: RulesConfig | None = None) -> LocalRule:
    if name == "ff":
        return ForwardForward(num_classes, options)
    if name == "sff":
        return ScalableForwardForward()
    if name == "forward_gradient":
        return ForwardGradient()
    raise ConfigError(f"horizon.rule={name!r}: not a block-local rule")


def check_rule(
    rule: str, model: BlockModel, options: RulesConfig | None = None, stages: int = 1
) -> None:
    """What a rule beyond the horizon asks of the model (built on the meta device) and of its
    options; one line naming the field and the fix."""
    if rule in HEADS and model.head_mode not in HEADS[rule]:
        raise ConfigError(
            f"model.head={model.head_mode}: rule {rule} needs model.head={HEADS[rule][0]}"
        )
    if rule == "forward_gradient":
        for t in range(model.num_blocks):
            perturbations(model, t)
    if rule == "ff" and options is not None and options.ff_straight_through:
        for t in range(model.num_blocks):
            relu_inputs(model, t)
    if rule == "pepita":
        check_pepita(model, options or RulesConfig(), stages)


def make_engine(model: BlockModel, plan: Plan, options: EngineOptions | None = None) -> Engine:
    """The engine for ``plan``'s rule over the blocks ``model`` holds (an ``EngineFactory``;
    ``options.rules``: the options of the rules beyond the horizon)."""
    options = options or EngineOptions()
    if plan.top_down:
        return PepitaEngine(model, plan, options)
    if plan.is_local:
        rule = local_rule(plan.rule, model.num_classes, options.rules)
        return LocalEngine(model, plan, options, rule)
    return HorizonEngine(model, plan, options)


__all__ = [
    "HEADS",
    "ForwardForward",
    "ForwardGradient",
    "LocalEngine",
    "LocalRule",
    "LocalStep",
    "PepitaEngine",
    "ScalableForwardForward",
    "check_rule",
    "local_rule",
    "make_engine",
    "predict_by_average",
    "predict_by_goodness",
]
