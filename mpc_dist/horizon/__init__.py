"""Choosing the horizon: gradient alignment with back-propagation (the probe), the fitted
alignment and memory laws, and the selection of (rule, h) for an objective (block costs are
measured by ``core.costs``). Below ``train`` (which runs it for ``horizon.horizon: auto``);
it knows nothing of data files or checkpoints."""

from .alignment import Alignment, block_gradients, probe
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
    "measure_candidates",
    "probe",
    "step_seconds",
]
