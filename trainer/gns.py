"""Gradient noise scale estimators (McCandlish et al. 2018, Appendix A). Pure math, no I/O, no torch.

A mean gradient over b i.i.d. examples satisfies E|g_b|^2 = |G|^2 + tr(Sigma)/b. Two batch sizes
b_small < b_big therefore give unbiased estimates of |G|^2 and tr(Sigma); B_simple = tr(Sigma)/|G|^2.

Single-step estimates are very noisy (the |G|^2 estimate is often negative), so the trainer stores the
raw ingredients (|g_small|^2, b_small, |g_big|^2, b_big) and forms B_simple as a *ratio of averages*:
numerator and denominator are smoothed separately (windowed means or EMAs), never the per-step ratios.
The EMA decays per example seen, so changing the batch size mid-run does not change its window.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "BSimpleEMA",
    "ExampleEMA",
    "b_simple_window",
    "linreg_b_simple",
    "linreg_population_loss",
    "unbiased_estimates",
]


def unbiased_estimates(g_small_sq, b_small, g_big_sq, b_big):
    """Unbiased (|G|^2, tr(Sigma)) from one pair of squared gradient norms; works on floats and arrays.

    Raw and unclamped on purpose: clamping a single step's negative |G|^2 to zero would bias the average.
    """
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    tr_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, tr_sigma


def b_simple_window(g_small_sq, b_small, g_big_sq, b_big, window: int | None = None) -> float:
    """B_simple as the ratio of the means of the unbiased estimates over the last `window` measurements.

    Rows with a missing (NaN) or non-finite ingredient are skipped, as the trainer's EMA skips them.
    Returns NaN when nothing is left or the mean |G|^2 is not positive (B_simple is then undefined).
    """
    arrs = [np.asarray(a, dtype=float) for a in (g_small_sq, b_small, g_big_sq, b_big)]
    arrs = np.broadcast_arrays(*arrs)
    ok = np.logical_and.reduce([np.isfinite(a) for a in arrs]) & (arrs[3] > arrs[1])
    gs, bs, gb, bb = (a[ok] for a in arrs)
    if window is not None:
        gs, bs, gb, bb = gs[-window:], bs[-window:], gb[-window:], bb[-window:]
    if gs.size == 0:
        return math.nan
    g_sq, tr_sigma = unbiased_estimates(gs, bs, gb, bb)
    mean_g = float(np.mean(g_sq))
    return float(np.mean(tr_sigma)) / mean_g if mean_g > 0 else math.nan


class ExampleEMA:
    """Exponential moving average whose decay is counted in examples, not steps.

    After `n` new examples the old value keeps weight exp(-n / window). The zero start is bias-corrected
    (like Adam), so the first values are plain averages rather than shrunk towards zero.
    """

    def __init__(self, window_examples: float):
        if not window_examples > 0:
            raise ValueError("window_examples must be positive")
        self.window = float(window_examples)
        self._num = 0.0
        self._weight = 0.0
        self._last_examples, self._keep = None, 0.0

    def update(self, value: float, examples: float) -> None:
        if examples != self._last_examples:  # the common case repeats the same step size: skip the exp
            self._last_examples, self._keep = examples, math.exp(-float(examples) / self.window)
        keep = self._keep
        self._num = keep * self._num + (1.0 - keep) * float(value)
        self._weight = keep * self._weight + (1.0 - keep)

    @property
    def value(self) -> float:
        return self._num / self._weight if self._weight > 0 else math.nan


class BSimpleEMA:
    """Running B_simple: ratio of per-example EMAs of the unbiased tr(Sigma) and |G|^2 estimates.

    `examples` passed to `update` is the number of training examples seen since the previous update
    (measured or not), so a run measured every 10th step keeps the same window in examples.
    """

    def __init__(self, window_examples: float):
        self.g_sq = ExampleEMA(window_examples)
        self.tr_sigma = ExampleEMA(window_examples)
        self._pending = 0.0

    def update(self, g_small_sq: float, b_small: float, g_big_sq: float, b_big: float, examples: float) -> float:
        """Fold one measurement in and return the current B_simple (NaN while |G|^2 is not positive).

        Non-finite ingredients (an overflowing step) are skipped rather than poisoning the average.
        """
        examples += self._pending
        self._pending = 0.0
        if not all(math.isfinite(v) for v in (g_small_sq, b_small, g_big_sq, b_big)) or not b_big > b_small:
            self._pending = examples
            return self.value
        g_sq, tr_sigma = unbiased_estimates(g_small_sq, b_small, g_big_sq, b_big)
        self.g_sq.update(g_sq, examples)
        self.tr_sigma.update(tr_sigma, examples)
        return self.value

    @property
    def value(self) -> float:
        g_sq = self.g_sq.value
        return self.tr_sigma.value / g_sq if g_sq > 0 else math.nan


def linreg_b_simple(dim: int, sigma: float, delta_sq: float) -> float:
    """Closed-form B_simple for linear regression, x ~ N(0, I_d), y = w*.x + N(0, sigma^2), loss (w.x - y)^2 / 2.

    With delta = w - w*: G = delta, tr(Sigma) = (d + 1)|delta|^2 + d sigma^2, so
    B_simple = d (1 + sigma^2 / |delta|^2) + 1.
    """
    return dim * (1.0 + sigma**2 / delta_sq) + 1.0


def linreg_population_loss(delta_sq: float, sigma: float) -> float:
    """Expected loss of the linear-regression task: (|delta|^2 + sigma^2) / 2."""
    return 0.5 * (delta_sq + sigma**2)
