"""The horizon semantics (spec sections 1, 2 and 6): plans, the engine, the reference definition
and activation accounting. Nothing here knows about processes or torch.distributed."""

from .engine import (
    ComputeOptions,
    Criterion,
    Engine,
    EngineFactory,
    EngineOptions,
    ForwardResult,
    LossScaler,
)
from .horizon_engine import HorizonEngine
from .memory import ActivationMemory
from .plan import (
    HORIZON_RULES,
    LOCAL_RULES,
    RULES,
    TOP_DOWN_RULES,
    Plan,
    PlanPart,
    Stream,
    check_horizon,
)
from .reference import reference_gradients

__all__ = [
    "HORIZON_RULES",
    "LOCAL_RULES",
    "RULES",
    "ActivationMemory",
    "ComputeOptions",
    "Criterion",
    "Engine",
    "EngineFactory",
    "EngineOptions",
    "ForwardResult",
    "HorizonEngine",
    "LossScaler",
    "Plan",
    "PlanPart",
    "Stream",
    "TOP_DOWN_RULES",
    "check_horizon",
    "reference_gradients",
]
