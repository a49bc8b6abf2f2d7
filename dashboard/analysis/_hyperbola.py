"""The one fit behind both batch-size laws: y = a + sign * log(1 + c / B), least squares in log space.

    steps to target  S(B) = S_min (1 + B_crit/B)        -> y = log S,   a = log S_min,   sign = +1
    best LR          eps(B) = eps_max / (1 + B_noise/B)  -> y = log eps, a = log eps_max, sign = -1

Why a profile over c instead of a generic 2-parameter optimizer: for a fixed c the best `a` is a mean,
so the sum of squares is a 1-D function of log c. Evaluating it on a fixed log grid (one matrix
product, for the point estimate and all bootstrap samples at once) and polishing the minimum with a
parabola then Brent's method finds the global optimum, needs no starting values, keeps S_min, E_min > 0
by construction (c > 0, a real), and says plainly when the optimum runs off the grid (c -> 0: no
benefit from larger batches; c -> inf: perfect scaling over the whole range), where any finite
answer would be a wrong line. The same grid is used by the SQL macro critical_batch, so the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

# Grid in ln(c): from 4 decades below the smallest batch size to 4 decades above the largest.
GRID_MARGIN = np.log(1e4)
GRID_STEP = 0.01  # in ln units (1 %), matching schema/sql/20_analysis.sql
BOOT_GRID_STEP = 0.05  # coarser grid for bootstrap samples, then a parabola through the minimum


@dataclass(frozen=True)
class ProfileFit:
    """Internal result: c, a, goodness of fit, and bootstrap draws (c may be 0 or inf at a boundary)."""

    c: float
    a: float
    boundary: str | None  # None, "low" (c -> 0) or "high" (c -> inf)
    fitted: np.ndarray  # model y at each point
    residuals: np.ndarray  # y - fitted
    r2: float
    rmse: float
    boot_c: np.ndarray
    boot_a: np.ndarray
    unbounded: bool = False  # the profile SSE at a grid end is within the 90 % profile interval


def grid(b: np.ndarray, step: float = GRID_STEP) -> np.ndarray:
    """The ln(c) grid for batch sizes b."""
    lo = np.log(b.min()) - GRID_MARGIN
    hi = np.log(b.max()) + GRID_MARGIN
    n = int(np.ceil((hi - lo) / step))
    return lo + step * np.arange(n + 1)


def _sse_matrix(y: np.ndarray, f: np.ndarray, sign: float) -> np.ndarray:
    """SSE[b, k] of the profiled fit for each row y[b] and each grid column f[k] = ln(1 + c_k/B)."""
    n = y.shape[1]
    y1, y2 = y.sum(1), (y * y).sum(1)
    f1, f2 = f.sum(1), (f * f).sum(1)
    cross = np.einsum("bi,ki->bk", y, f)  # not BLAS: tiny matrices, and threads only contend here
    return y2[:, None] - 2 * sign * cross + f2[None, :] - (y1[:, None] - sign * f1[None, :]) ** 2 / n


def _argmin_parabola(sse: np.ndarray, lnc: np.ndarray) -> np.ndarray:
    """ln(c) at each row's grid minimum, refined by a parabola; -inf / +inf at the grid's ends."""
    k = np.argmin(sse, axis=1)
    out = lnc[k].astype(float)
    inner = (k > 0) & (k < len(lnc) - 1)
    rows = np.nonzero(inner)[0]
    if rows.size:
        ki = k[rows]
        s0, s1, s2 = sse[rows, ki - 1], sse[rows, ki], sse[rows, ki + 1]
        den = s0 - 2 * s1 + s2
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(den > 0, 0.5 * (s0 - s2) / den, 0.0)
        out[rows] += np.clip(off, -1, 1) * (lnc[1] - lnc[0])
    out[k == 0] = -np.inf
    out[k == len(lnc) - 1] = np.inf
    return out


def _profile_a(y: np.ndarray, b: np.ndarray, c: float, sign: float) -> float:
    return float(np.mean(y - sign * np.log1p(c / b)))


def fit_profile(b: np.ndarray, y: np.ndarray, sign: float, n_boot: int = 1000, seed: int = 0) -> ProfileFit:
    """Least-squares fit of y = a + sign*ln(1 + c/b) with a residual bootstrap of (c, a)."""
    b = np.asarray(b, dtype=float)
    y = np.asarray(y, dtype=float)
    n = len(b)
    lnc = grid(b)
    f = np.log1p(np.exp(lnc)[:, None] / b[None, :])
    sse = _sse_matrix(y[None, :], f, sign)[0]
    k = int(np.argmin(sse))
    boundary = "low" if k == 0 else ("high" if k == len(lnc) - 1 else None)
    if boundary is None:
        def obj(t: float) -> float:
            f_t = np.log1p(np.exp(t) / b)
            r = y - sign * f_t
            return float(((r - r.mean()) ** 2).sum())

        res = minimize_scalar(obj, bounds=(lnc[k - 1], lnc[k + 1]), method="bounded", options={"xatol": 1e-9})
        lnc_hat = float(res.x) if res.fun <= sse[k] else float(lnc[k])
        c = float(np.exp(lnc_hat))
        a = _profile_a(y, b, c, sign)
        fitted = a + sign * np.log1p(c / b)
    elif boundary == "low":  # c -> 0: y constant
        c, a = 0.0, float(y.mean())
        fitted = np.full(n, a)
    else:  # c -> inf: y = a' - sign*ln(b) with a' = a + sign*ln(c): pure 1/B law, a itself undefined
        c, a = float("inf"), float("nan")
        a_inf = float(np.mean(y + sign * np.log(b)))
        fitted = a_inf - sign * np.log(b)
    resid = y - fitted
    sst = float(((y - y.mean()) ** 2).sum())
    sse_hat = float((resid**2).sum())
    r2 = 1.0 - sse_hat / sst if sst > 0 else float("nan")
    rmse = float(np.sqrt(sse_hat / n))

    boot_c = np.empty(0)
    boot_a = np.empty(0)
    if n_boot > 0 and n > 2:
        rng = np.random.default_rng(seed)
        centered = (resid - resid.mean()) * np.sqrt(n / (n - 2))
        draws = fitted[None, :] + rng.choice(centered, size=(n_boot, n), replace=True)
        lnc_b = grid(b, BOOT_GRID_STEP)
        f_b = np.log1p(np.exp(lnc_b)[:, None] / b[None, :])
        t = _argmin_parabola(_sse_matrix(np.vstack([y, draws]), f_b, sign), lnc_b)
        # remove the coarse grid's discretization error: shift by (fine - coarse) on the original data
        shift = np.log(c) - t[0] if boundary is None and np.isfinite(t[0]) else 0.0
        boot_c = np.exp(t[1:] + shift)
        with np.errstate(invalid="ignore"):
            boot_a = np.mean(draws - sign * np.log1p(boot_c[:, None] / b[None, :]), axis=1)
        boot_a[~np.isfinite(boot_c)] = np.nan
    return ProfileFit(c, a, boundary, fitted, resid, r2, rmse, boot_c, boot_a, profile_unbounded(sse, n))


# chi-square(1) at 90 %: the profile-likelihood interval of ln c is where n ln(SSE/SSE_min) <= this
PROFILE_CHI2 = 2.706


def profile_unbounded(sse: np.ndarray, n: int) -> bool:
    """Whether the data leave c unbounded on one side: an end of the grid lies inside the 90 % profile
    interval (the rule of the SQL macro critical_batch_of, so both give the same warning)."""
    limit = float(sse.min()) * np.exp(PROFILE_CHI2 / n)
    return bool(sse[0] <= limit or sse[-1] <= limit)


def interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval that tolerates +-inf draws (no interpolation between inf and a number)."""
    d = np.sort(np.asarray(draws, dtype=float)[~np.isnan(draws)])
    if d.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    lo = d[int(np.floor(alpha * (d.size - 1)))]
    hi = d[int(np.ceil((1.0 - alpha) * (d.size - 1)))]
    return (float(lo), float(hi))
