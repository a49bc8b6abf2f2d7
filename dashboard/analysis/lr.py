"""Best learning rate against batch size: eps_opt(B) = eps_max / (1 + B_noise/B) (McCandlish et al. 2018).

For SGD the best LR grows linearly with B while B << B_noise and saturates at eps_max above it, so the
knee gives a second, independent estimate of the noise scale. Fitted on log LR (LR grids are
multiplicative) with the same profile fit as the tradeoff frontier. LR grids are coarse (often factors
of 2), so expect wide intervals; a best LR at the edge of its grid is only a bound and is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from dashboard.analysis._fit import NAN, NAN2, BatchLawFit, empty
from dashboard.analysis._hyperbola import fit_profile, interval
from dashboard.analysis.frames import as_frame, by_batch, column, flag, require


@dataclass(frozen=True)
class LRLawFit(BatchLawFit):
    """What both LR laws (SGD's here, Adam's surge law in adam_lr.py) give: eps_max, b_noise and their
    bootstrap intervals (*_ci at ci_level), the best LRs fitted (`lrs`, one per batch size); fitted is
    the model's LR there."""

    eps_max: float = NAN
    b_noise: float = NAN
    eps_max_ci: tuple[float, float] = NAN2
    b_noise_ci: tuple[float, float] = NAN2
    lrs: np.ndarray = field(default_factory=empty)

    def predict(self, batch_size: Any) -> np.ndarray:
        """eps_opt(B) on the fitted law: each law gives its own."""
        raise NotImplementedError

    def curve(self, n: int = 100) -> pl.DataFrame:
        """The fitted curve for plotting: batch_size, lr."""
        if not self.ok:
            return pl.DataFrame(schema={"batch_size": pl.Float64, "lr": pl.Float64})
        b = self.curve_batches(n)
        return pl.DataFrame({"batch_size": b, "lr": self.predict(b)})


@dataclass(frozen=True)
class LRScalingFit(LRLawFit):
    """Result of lr_scaling; `reason` says why there is no fit (numbers are then NaN).

    eps_max, b_noise and their bootstrap intervals (*_ci at ci_level); r2 / rmse_log on log LR;
    batch_sizes, lrs, fitted (model LR), residuals (log(lr/fitted)); warnings for caveats.
    """

    def predict(self, batch_size: Any) -> np.ndarray:
        """eps_opt(B) on the fitted curve (NaN when there is no fit)."""
        b = np.asarray(batch_size, dtype=float)
        return self.eps_max / (1.0 + self.b_noise / b) if self.ok else np.full(b.shape, NAN)


def too_few_reason(n: int, min_batches: int) -> str:
    """Why an LR law is not fitted to `n` < `min_batches` batch sizes (the same words for both laws)."""
    what = "no batch size has a best LR" if n == 0 else f"only {n} batch size(s) with a best LR"
    return f"{what}; the fit needs at least {min_batches}"


def best_lr_points(best: Any, drop_edges: bool) -> tuple[pl.DataFrame, np.ndarray, np.ndarray, list[str]]:
    """The best-LR points both LR laws fit: (frame, batch sizes, LRs, warnings), one LR per batch size
    (the geometric mean if several rows were given), positive and finite.

    One target only; rows that did not reach it are left out, and a best LR at the edge of its grid is
    a warning (or left out with `drop_edges`): the SGD and Adam fits then see the same points.
    """
    f = as_frame(best, "best")
    require(f, ["batch_size", "lr"], "best")
    if "target" in f.columns and f["target"].n_unique() > 1:
        raise ValueError("best has several targets: filter to one")
    warnings: list[str] = []
    b, lr = column(f, "batch_size"), column(f, "lr")
    keep = flag(f, "reached", default=True)
    edge = keep & flag(f, "lr_at_edge")
    if edge.any():
        bs = ", ".join(f"{x:g}" for x in sorted(b[edge]))
        if drop_edges:
            keep &= ~edge
            warnings.append(f"left out B = {bs}: best LR at the edge of the grid")
        else:
            warnings.append(f"best LR at the edge of the LR grid for B = {bs}: only a bound there")
    keep &= np.isfinite(lr) & (lr > 0) & np.isfinite(b) & (b > 0)
    b, lr = by_batch(b[keep], lr[keep], "geomean")
    return f, b, lr, warnings


def lr_scaling(
    best: Any,
    *,
    ci: float = 0.90,
    n_boot: int = 1000,
    seed: int = 0,
    min_batches: int = 3,
    drop_edges: bool = False,
    optimizer: str | None = None,
) -> LRScalingFit:
    """Fit eps_opt(B) = eps_max/(1 + B_noise/B) to the best LR per batch size (best_per_batch output).

    `drop_edges=True` leaves out batch sizes whose best LR is the smallest or largest tried (their
    optimum may lie outside the grid). No fit, with a reason, for fewer than `min_batches` batch
    sizes, when the best LR does not change with B (B_noise below the smallest batch, or a grid too
    coarse to see it), or when it grows as B all the way (linear scaling rule holds: B_noise above the
    largest batch). Pass optimizer="adam" (or keep an `optimizer` column) to be warned that the law is
    derived for SGD.
    """
    f, b, lr, warnings = best_lr_points(best, drop_edges)
    opt = optimizer or (f["optimizer"].drop_nulls().first() if "optimizer" in f.columns else None)
    if opt and str(opt).lower().startswith("adam"):
        warnings.append("eps_opt(B) = eps_max/(1 + B_noise/B) is derived for SGD; Adam's best LR scales differently")
    base = dict(batch_sizes=b, lrs=lr, n_points=len(b), ci_level=ci)
    if len(b) < min_batches:
        return LRScalingFit(reason=too_few_reason(len(b), min_batches), warnings=tuple(warnings), **base)
    p = fit_profile(b, np.log(lr), sign=-1.0, n_boot=n_boot, seed=seed)
    base.update(fitted=np.exp(p.fitted), residuals=p.residuals, r2=p.r2, rmse_log=p.rmse)
    if p.boundary == "low":
        return LRScalingFit(reason=(
            f"the best LR does not change with batch size over B = {b.min():g}..{b.max():g}: B_noise is below "
            "the smallest batch, or the LR grid is too coarse to show it"), warnings=tuple(warnings), **base)
    if p.boundary == "high":
        return LRScalingFit(reason=(
            f"the best LR grows in proportion to B over the whole range B = {b.min():g}..{b.max():g} (linear "
            "scaling): B_noise is above the largest batch"), warnings=tuple(warnings), **base)
    if not (b.min() <= p.c <= b.max()):
        warnings.append(f"B_noise = {p.c:.3g} lies outside the batch sizes measured: extrapolated")
    ci_b = interval(p.boot_c, ci)
    if np.isinf(ci_b[1]) or ci_b[0] == 0:
        warnings.append("the data do not bound B_noise on one side")
    boot_e = np.exp(np.where(np.isnan(p.boot_a), np.inf, p.boot_a))
    return LRScalingFit(
        eps_max=float(np.exp(p.a)), b_noise=float(p.c), eps_max_ci=interval(boot_e, ci), b_noise_ci=ci_b,
        warnings=tuple(warnings), **base,
    )
