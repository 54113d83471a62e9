"""Choosing the horizon: gradient alignment with back-propagation (the probe), the fitted
alignment and memory laws, measured block costs for the pipeline simulator, and the selection
of (rule, h) for an objective. Below ``train`` (which runs it for ``horizon.horizon: auto``);
it knows nothing of data files or checkpoints."""

from .alignment import Alignment, block_gradients, probe
from .costs import measure_block, middle_block_costs, model_block_costs
from .laws import AlignmentLaw, LinearLaw, fit_alignment, fit_linear
from .select import (
    OBJECTIVES,
    Candidate,
    Selection,
    Setting,
    candidate_horizons,
    choose,
    step_seconds,
)
from .select import measure as measure_candidates

__all__ = [
    "OBJECTIVES",
    "Alignment",
    "AlignmentLaw",
    "Candidate",
    "LinearLaw",
    "Selection",
    "Setting",
    "block_gradients",
    "candidate_horizons",
    "choose",
    "fit_alignment",
    "fit_linear",
    "measure_block",
    "middle_block_costs",
    "measure_candidates",
    "model_block_costs",
    "probe",
    "step_seconds",
]
