"""Best Adam learning rate against batch size: the "surge" law of Li et al. 2024 beside SGD's.

Li et al. (arXiv 2405.14578) derive for Adam-style updates (sign-like for small batches)

    eps_opt(B) = eps_max / (0.5 * (sqrt(B_noise/B) + sqrt(B/B_noise)))

which rises as sqrt(B) below B_noise, peaks at B = B_noise and falls as 1/sqrt(B) above it, where SGD's
eps_opt(B) = eps_max/(1 + B_noise/B) (dashboard/analysis/lr.py) rises linearly and saturates. Both are
two-parameter laws in log LR, so they are compared on the same points by their squared error.

Fitted like the SGD law (dashboard/analysis/_hyperbola.py): for a fixed B_noise the best log eps_max is
a mean, so the fit is a profile over ln B_noise on a fixed grid, polished with Brent's method, and a
residual bootstrap gives intervals. The grid's ends are the two power laws (LR ~ 1/sqrt(B) when the
peak lies below every batch, LR ~ sqrt(B) when above): an optimum there is "no fit", with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy.optimize import minimize_scalar

from dashboard.analysis._fit import NAN
from dashboard.analysis._hyperbola import BOOT_GRID_STEP, _argmin_parabola, _sse_matrix, grid, interval
from dashboard.analysis.lr import LRLawFit, LRScalingFit, best_lr_points, lr_scaling, too_few_reason

TIE = 0.10  # relative difference in squared error below which neither law is called better


def surge_shape(b: Any, b_noise: float) -> np.ndarray:
    """ln(0.5 (sqrt(B_noise/B) + sqrt(B/B_noise))): 0 at the peak, so log eps = log eps_max - this."""
    r = np.sqrt(np.asarray(b, dtype=float) / b_noise)
    return np.log(0.5 * (1.0 / r + r))


@dataclass(frozen=True)
class AdamLRFit(LRLawFit):
    """Result of adam_lr_scaling; `reason` says why there is no surge fit (its numbers are then NaN).

    eps_max (the peak LR) and b_noise (where it peaks) with bootstrap intervals; r2 / rmse_log /
    sse_log on log LR; `sgd` is SGD's law fitted to the same points, and `better` says which law fits
    them better ("surge", "sgd", "neither" within TIE, or None when one of them could not be fitted).
    """

    sse_log: float = NAN
    sgd: LRScalingFit | None = None
    better: str | None = None
    comparison: str = ""

    def predict(self, batch_size: Any) -> np.ndarray:
        """eps_opt(B) on the fitted surge curve (NaN when there is no fit)."""
        b = np.asarray(batch_size, dtype=float)
        return self.eps_max * np.exp(-surge_shape(b, self.b_noise)) if self.ok else np.full(b.shape, NAN)


def _profile(b: np.ndarray, y: np.ndarray, n_boot: int, seed: int):
    """(ln c, boundary, a, fitted, boot_c, boot_a) of y = a - surge_shape(b, c), least squares."""
    lnc = grid(b)
    f = surge_shape(b[None, :], np.exp(lnc)[:, None])
    sse = _sse_matrix(y[None, :], f, -1.0)[0]
    k = int(np.argmin(sse))
    boundary = "low" if k == 0 else ("high" if k == len(lnc) - 1 else None)
    t = float(lnc[k])
    if boundary is None:
        def obj(u: float) -> float:
            r = y + surge_shape(b, np.exp(u))
            return float(((r - r.mean()) ** 2).sum())

        res = minimize_scalar(obj, bounds=(lnc[k - 1], lnc[k + 1]), method="bounded", options={"xatol": 1e-9})
        t = float(res.x) if res.fun <= sse[k] else t
    c = float(np.exp(t))
    a = float(np.mean(y + surge_shape(b, c)))
    fitted = a - surge_shape(b, c)
    boot_c = boot_a = np.empty(0)
    if n_boot > 0 and len(b) > 2 and boundary is None:
        rng = np.random.default_rng(seed)
        resid = y - fitted
        centered = (resid - resid.mean()) * np.sqrt(len(b) / (len(b) - 2))
        draws = fitted[None, :] + rng.choice(centered, size=(n_boot, len(b)), replace=True)
        lnc_b = grid(b, BOOT_GRID_STEP)
        f_b = surge_shape(b[None, :], np.exp(lnc_b)[:, None])
        tb = _argmin_parabola(_sse_matrix(np.vstack([y, draws]), f_b, -1.0), lnc_b)
        shift = t - tb[0] if np.isfinite(tb[0]) else 0.0  # the coarse grid's offset on the original data
        boot_c = np.exp(tb[1:] + shift)
        with np.errstate(invalid="ignore", over="ignore"):
            boot_a = np.array([np.mean(d + surge_shape(b, cb)) if np.isfinite(cb) and cb > 0 else np.nan
                               for d, cb in zip(draws, boot_c, strict=True)])
    return c, boundary, a, fitted, boot_c, boot_a


def _compare(surge_sse: float, sgd: LRScalingFit, ok: bool) -> tuple[str | None, str]:
    """Which law has the smaller squared log error on the same points. SGD's law at the end of its grid
    (a constant LR, or LR proportional to B) is still that law's best curve, so it is compared too."""
    if not ok:
        return None, "no comparison: the surge law could not be fitted"
    if sgd.residuals.size != sgd.n_points or sgd.n_points == 0:
        return None, f"no comparison: SGD's law could not be fitted ({sgd.reason})"
    sgd_sse = float(np.sum(sgd.residuals**2))
    note = "" if sgd.ok else f"; SGD's law only at its limit: {sgd.reason}"
    lo, hi = min(surge_sse, sgd_sse), max(surge_sse, sgd_sse)
    if hi <= 0 or (hi - lo) <= TIE * hi:
        return "neither", (f"both laws fit about equally well (squared log error {surge_sse:.3g} surge vs "
                           f"{sgd_sse:.3g} SGD){note}")
    better = "surge" if surge_sse < sgd_sse else "sgd"
    name = "Adam's surge law (Li et al. 2024)" if better == "surge" else "SGD's eps_max/(1 + B_noise/B)"
    return better, f"{name} fits better: squared log error {surge_sse:.3g} (surge) vs {sgd_sse:.3g} (SGD){note}"


def adam_lr_scaling(best: Any, *, ci: float = 0.90, n_boot: int = 1000, seed: int = 0, min_batches: int = 3,
                    drop_edges: bool = False) -> AdamLRFit:
    """Fit the surge law to the best LR per batch size (best_per_batch output) and compare with SGD's.

    The same inputs and options as lr_scaling (`reached`, `lr_at_edge` columns are honoured). No fit,
    with a reason, for fewer than `min_batches` batch sizes or when the best LR moves monotonically as
    a square root over the whole range (the peak lies outside the batches measured).
    """
    _, bk, lk, warnings = best_lr_points(best, drop_edges)
    sgd = lr_scaling(pl.DataFrame({"batch_size": bk, "lr": lk}), ci=ci, n_boot=n_boot, seed=seed,
                     min_batches=min_batches)
    base = dict(batch_sizes=bk, lrs=lk, n_points=len(bk), ci_level=ci, sgd=sgd)
    if len(bk) < min_batches:
        return AdamLRFit(reason=too_few_reason(len(bk), min_batches), comparison=_compare(NAN, sgd, False)[1],
                         warnings=tuple(warnings), **base)
    y = np.log(lk)
    c, boundary, a, fitted, boot_c, boot_a = _profile(bk, y, n_boot, seed)
    resid = y - fitted
    sse = float((resid**2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    base.update(fitted=np.exp(fitted), residuals=resid, sse_log=sse, rmse_log=float(np.sqrt(sse / len(bk))),
                r2=1.0 - sse / sst if sst > 0 else NAN)
    reason = None
    if boundary == "low":
        reason = (f"the best LR falls as 1/sqrt(B) over the whole range B = {bk.min():g}..{bk.max():g}: the peak "
                  "(B_noise) lies below the smallest batch")
    elif boundary == "high":
        reason = (f"the best LR rises as sqrt(B) over the whole range B = {bk.min():g}..{bk.max():g}: the peak "
                  "(B_noise) lies above the largest batch")
    better, comparison = _compare(sse, sgd, reason is None)
    if reason is not None:
        return AdamLRFit(reason=reason, comparison=comparison, warnings=tuple(warnings), **base)
    if not (bk.min() <= c <= bk.max()):
        warnings.append(f"the peak B_noise = {c:.3g} lies outside the batch sizes measured: extrapolated")
    ci_b = interval(boot_c, ci)
    if np.isinf(ci_b[1]) or ci_b[0] == 0:
        warnings.append("the data do not bound B_noise on one side")
    return AdamLRFit(eps_max=float(np.exp(a)), b_noise=c, eps_max_ci=interval(np.exp(boot_a), ci), b_noise_ci=ci_b,
                     better=better, comparison=comparison, warnings=tuple(warnings), **base)
