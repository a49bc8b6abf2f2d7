"""The fields every batch-size law's result shares (tradeoff frontier, SGD and Adam LR laws).

One base, so "no fit" looks the same everywhere: `reason` set, the law's numbers NaN, the points and
the caveats kept; and the plotted curves of all three span the same batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NAN = float("nan")
NAN2 = (NAN, NAN)


def empty() -> np.ndarray:
    return np.empty(0)


@dataclass(frozen=True)
class BatchLawFit:
    """A law fitted on log y over batch sizes: the points fitted (batch_sizes, fitted: the model there,
    residuals: log(y/fitted)), r2 / rmse_log on log y, bootstrap intervals at ci_level; `reason` says
    why there is no fit; warnings are caveats that do not stop it."""

    ci_level: float = 0.90
    r2: float = NAN
    rmse_log: float = NAN
    n_points: int = 0
    batch_sizes: np.ndarray = field(default_factory=empty)
    fitted: np.ndarray = field(default_factory=empty)
    residuals: np.ndarray = field(default_factory=empty)
    reason: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason is None

    def curve_batches(self, n: int = 100) -> np.ndarray:
        """n batch sizes, log-spaced from half the smallest fitted to twice the largest: where curves are drawn."""
        return np.exp(np.linspace(np.log(self.batch_sizes.min() / 2), np.log(self.batch_sizes.max() * 2), n))

