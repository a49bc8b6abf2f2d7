"""Gradient noise scale estimators (McCandlish et al. 2018, Appendix A). Pure math, no I/O, no torch.

A mean gradient over b i.i.d. examples satisfies E|g_b|^2 = |G|^2 + tr(Sigma)/b. Two batch sizes
b_small < b_big therefore give unbiased estimates of |G|^2 and tr(Sigma); B_simple = tr(Sigma)/|G|^2.

Single-step estimates are very noisy (the |G|^2 estimate is often negative), so the trainer stores the
raw ingredients (|g_small|^2, b_small, |g_big|^2, b_big) and forms B_simple as a *ratio of averages*:
numerator and denominator are smoothed separately (windowed means or EMAs), never the per-step ratios.
The trainer's online value (`TrackingBSimple`) follows the truth while the loss falls: it averages
just enough recent measurements for a set relative standard error, chosen per step from the measured
scatter. A fixed EMA (`BSimpleEMA`, decaying per example seen) remains for a user-set window.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import lfilter

__all__ = [
    "BSimpleEMA",
    "TrackingBSimple",
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
        self._weight_sq = 0.0
        self._last_examples, self._keep = None, 0.0

    def update(self, value: float, examples: float) -> None:
        if examples != self._last_examples:  # the common case repeats the same step size: skip the exp
            self._last_examples, self._keep = examples, math.exp(-float(examples) / self.window)
        keep = self._keep
        self._num = keep * self._num + (1.0 - keep) * float(value)
        self._weight = keep * self._weight + (1.0 - keep)
        self._weight_sq = keep * keep * self._weight_sq + (1.0 - keep) ** 2

    @property
    def value(self) -> float:
        return self._num / self._weight if self._weight > 0 else math.nan

    @property
    def n_eff(self) -> float:
        """Effective number of values behind `value` (Kish: (sum w)^2 / sum w^2); 0 before the first."""
        return self._weight**2 / self._weight_sq if self._weight_sq > 0 else 0.0


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

    @property
    def n_eff(self) -> float:
        """Effective number of measurements behind `value` (numerator and denominator share weights)."""
        return self.g_sq.n_eff

    def update_block(self, g_small_sq, b_small, g_big_sq, b_big, examples) -> tuple[np.ndarray, np.ndarray]:
        """`update` row by row (examples: seen since the previous row); returns (b_simple, n_eff) per row."""
        rows = zip(*(np.asarray(a, dtype=float).tolist() for a in (g_small_sq, b_small, g_big_sq, b_big, examples)),
                   strict=True)
        out = [(self.update(*r), self.n_eff) for r in rows]
        return np.array([v for v, _ in out]), np.array([n for _, n in out])


class TrackingBSimple:
    """Online B_simple that tracks: the shortest recent average with a relative standard error ~`target_rse`.

    A bank of EMAs (spans 2, 4, ..., 2048 measurements) keeps the unbiased |G|^2 and tr(Sigma)
    estimates and their second moments; numerator and denominator of each span share its weights.
    Per measurement, the relative variance of one tr(Sigma)/|G|^2 measurement,
    r^2 = Var(tr - R |G|^2) / mean(tr)^2 (delta method), is read from the `scatter_span` EMA, and the
    value is the ratio of the shortest span whose effective number of measurements (about 2 x span)
    reaches r^2 / target_rse^2, but no span longer than `history` x the measurements so far. Why: the
    ingredients change several-fold while the loss falls, so a long window lags (a 50-measurement EMA
    read 49-92 % low); the noise, which grows with B_simple / B, sets how many measurements a value
    needs, and training changes by similar factors over similar fractions of its elapsed length, so a
    window reaching back a quarter of the run bounds the lag where the noise would ask for more.
    `n_eff` says how many measurements were used (fewer than asked for when the cap binds: noisier).
    """

    SPANS = 2.0 ** np.arange(1, 12)

    def __init__(self, target_rse: float = 0.4, scatter_span: float = 64.0, history: float | None = 0.25):
        self.target = float(target_rse)
        self.history = history  # cap: span <= history x measurements so far (None: no cap)
        self._k = np.exp(-1.0 / self.SPANS)  # keep per measurement
        self._jv = int(np.argmin(np.abs(self.SPANS - scatter_span)))
        self._m = np.zeros((len(self.SPANS), 5))  # EMAs of g, t, g^2, t^2, g t (not bias-corrected)
        self._count = 0
        self.value, self.n_eff, self.span = math.nan, 0.0, math.nan

    def update_block(self, g_small_sq, b_small, g_big_sq, b_big, examples=None) -> tuple[np.ndarray, np.ndarray]:
        """Fold in a block of measurements (arrays) and return (b_simple, n_eff) per row (`examples` unused:
        spans count measurements, and the scatter that sets them already reflects the batch size).

        Rows with a non-finite ingredient, or b_big <= b_small, are skipped and repeat the last value.
        """
        arrs = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (g_small_sq, b_small, g_big_sq, b_big)))
        n = arrs[0].shape[0]
        ok = np.logical_and.reduce([np.isfinite(a) for a in arrs]) & (arrs[3] > arrs[1])
        out_v, out_n = np.full(n, math.nan), np.full(n, math.nan)
        if ok.any():
            g, t = unbiased_estimates(*(a[ok] for a in arrs))
            x = np.stack([g, t, g * g, t * t, g * t])  # (5, m)
            ems = np.empty((len(self.SPANS), 5, x.shape[1]))
            for j, k in enumerate(self._k):
                ems[j], zf = lfilter([1.0 - k], [1.0, -k], x, axis=1, zi=(k * self._m[j])[:, None])
                self._m[j] = zf[:, 0] / k
            counts = self._count + np.arange(1, x.shape[1] + 1)
            self._count = int(counts[-1])
            kc = self._k[:, None] ** counts[None, :]  # (J, m)
            w = 1.0 - kc  # bias correction of the zero start
            w2 = (1.0 - self._k[:, None]) ** 2 * (1.0 - kc**2) / (1.0 - self._k[:, None] ** 2)
            mean = ems / w[:, None, :]
            n_eff = w**2 / w2
            gm, tm = mean[:, 0], mean[:, 1]
            v = self._jv
            with np.errstate(divide="ignore", invalid="ignore"):
                r = tm[v] / gm[v]
                rel_var = (mean[v, 3] - tm[v] ** 2 - 2 * r * (mean[v, 4] - gm[v] * tm[v])
                           + r * r * (mean[v, 2] - gm[v] ** 2)) / tm[v] ** 2
                need = np.where((gm[v] > 0) & np.isfinite(rel_var), np.maximum(rel_var, 0) / self.target**2, np.inf)
                j = np.minimum(np.searchsorted(2.0 * self.SPANS, need), len(self.SPANS) - 1)
                if self.history is not None:
                    j = np.minimum(j, np.maximum(np.searchsorted(self.SPANS, self.history * counts, "right") - 1, 0))
                cols = np.arange(x.shape[1])
                g_sel, t_sel = gm[j, cols], tm[j, cols]
                vals = np.where(g_sel > 0, t_sel / g_sel, math.nan)
            out_v[ok], out_n[ok] = vals, n_eff[j, cols]
            self.span = float(self.SPANS[j[-1]])
        # skipped rows repeat the value before them
        last_v, last_n = self.value, self.n_eff
        for i in range(n):
            if ok[i]:
                last_v, last_n = out_v[i], out_n[i]
            else:
                out_v[i], out_n[i] = last_v, last_n
        self.value, self.n_eff = float(last_v), float(last_n)
        return out_v, out_n


def linreg_b_simple(dim: int, sigma: float, delta_sq: float) -> float:
    """Closed-form B_simple for linear regression, x ~ N(0, I_d), y = w*.x + N(0, sigma^2), loss (w.x - y)^2 / 2.

    With delta = w - w*: G = delta, tr(Sigma) = (d + 1)|delta|^2 + d sigma^2, so
    B_simple = d (1 + sigma^2 / |delta|^2) + 1.
    """
    return dim * (1.0 + sigma**2 / delta_sq) + 1.0


def linreg_population_loss(delta_sq: float, sigma: float) -> float:
    """Expected loss of the linear-regression task: (|delta|^2 + sigma^2) / 2."""
    return 0.5 * (delta_sq + sigma**2)
