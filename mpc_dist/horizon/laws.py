"""The laws the selection fits (spec section 7): alignment 1 - cos^2(theta_h) = c (1 - h/T)^p
with both c and p (the paper fixes p = 3: the continuous-depth regime; independent blocks give
about 2), and memory M(h) = a h + b. Fits report their quality (R^2 in the fitted space)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AlignmentLaw:
    c: float
    p: float
    r2: float  # of log(1 - cos^2) against log(1 - h/T)
    points: int

    def misalignment(self, horizon: int, num_blocks: int) -> float:
        """Predicted 1 - cos^2(theta_h) (0 at h = T), within [0, 1]."""
        return min(1.0, self.c * (1 - horizon / num_blocks) ** self.p)

    def alignment(self, horizon: int, num_blocks: int) -> float:
        """Predicted cos^2(theta_h): the paper's relative progress of a step along g_h."""
        return 1.0 - self.misalignment(horizon, num_blocks)


@dataclass(frozen=True)
class LinearLaw:
    slope: float  # a
    intercept: float  # b
    r2: float

    def __call__(self, x: float) -> float:
        return self.slope * x + self.intercept


def _r2(y: np.ndarray, fitted: np.ndarray) -> float:
    spread = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - fitted) ** 2).sum()) / spread if spread > 0 else 1.0


def fit_alignment(
    horizons: Sequence[int], misalignments: Sequence[float], num_blocks: int
) -> AlignmentLaw:
    """Least squares in log-log space over the horizons below T with a positive misalignment."""
    pairs = [
        (math.log(1 - h / num_blocks), math.log(m))
        for h, m in zip(horizons, misalignments, strict=True)
        if h < num_blocks and m > 0
    ]
    if not pairs:
        return AlignmentLaw(0.0, 3.0, 1.0, 0)
    x, y = (np.array(v) for v in zip(*pairs, strict=True))
    if len(pairs) == 1:  # one point: the paper's exponent
        return AlignmentLaw(math.exp(y[0] - 3 * x[0]), 3.0, 1.0, 1)
    p, log_c = np.polyfit(x, y, 1)
    return AlignmentLaw(math.exp(log_c), float(p), _r2(y, p * x + log_c), len(pairs))


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> LinearLaw:
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return LinearLaw(0.0, float(y.mean()), 1.0)
    a, b = np.polyfit(x, y, 1)
    return LinearLaw(float(a), float(b), _r2(y, a * x + b))
