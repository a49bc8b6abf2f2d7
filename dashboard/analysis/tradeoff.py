"""The steps-vs-examples tradeoff and the critical batch size (McCandlish et al. 2018).

The Pareto frontier (S/S_min - 1)(E/E_min - 1) = 1 with E = B*S is S(B) = S_min + E_min/B. It is fitted
on log S, because run-to-run noise in steps-to-target is multiplicative (a 10 % slower run is 10 %
slower at any B), with S_min, E_min > 0. B_crit = E_min/S_min is where the frontier bends: below it,
doubling the batch halves the steps; above it, bigger batches mostly waste examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl

from dashboard.analysis._fit import NAN, NAN2, BatchLawFit, empty
from dashboard.analysis._hyperbola import fit_profile, interval
from dashboard.analysis.best import best_per_batch
from dashboard.analysis.frames import as_frame, by_batch, column, flag, require


@dataclass(frozen=True)
class TradeoffFit(BatchLawFit):
    """Result of fit_tradeoff. When no fit can be made, `reason` says why and the numbers are NaN.

    b_crit, s_min, e_min: the fit; *_ci: bootstrap percentile intervals at `ci_level` (an end may be
    0 or inf when resamples run off the grid: the data do not bound it). r2 and rmse_log are on log S.
    batch_sizes, steps: the points fitted; fitted: the model's S there; residuals: log(S/fitted).
    warnings: caveats that do not stop the fit (extrapolated B_crit, best LR at the grid edge, ...).
    """

    b_crit: float = NAN
    s_min: float = NAN
    e_min: float = NAN
    b_crit_ci: tuple[float, float] = NAN2
    s_min_ci: tuple[float, float] = NAN2
    e_min_ci: tuple[float, float] = NAN2
    steps: np.ndarray = field(default_factory=empty)
    n_boot: int = 0

    def predict(self, batch_size: Any) -> np.ndarray:
        """S(B) = S_min + E_min/B on the fitted frontier (NaN when there is no fit)."""
        b = np.asarray(batch_size, dtype=float)
        return self.s_min + self.e_min / b if self.ok else np.full(b.shape, NAN)

    def frontier(self, n: int = 100) -> pl.DataFrame:
        """The fitted curve for plotting: batch_size, steps, examples over (and a little beyond) the data."""
        if not self.ok:
            return pl.DataFrame(schema={"batch_size": pl.Float64, "steps": pl.Float64, "examples": pl.Float64})
        b = self.curve_batches(n)
        s = self.predict(b)
        return pl.DataFrame({"batch_size": b, "steps": s, "examples": b * s})

    def in_tokens(self, tokens_per_example: float) -> TradeoffFit:
        """The same fit with examples counted in tokens (every run of the sweep has `tokens_per_example`):
        batch sizes, E_min and B_crit scale by it, S_min and the fit's quality do not."""
        c = float(tokens_per_example)
        return replace(self, b_crit=self.b_crit * c, e_min=self.e_min * c, batch_sizes=self.batch_sizes * c,
                       b_crit_ci=tuple(x * c for x in self.b_crit_ci), e_min_ci=tuple(x * c for x in self.e_min_ci))

    def points(self) -> pl.DataFrame:
        """The fitted points with the model and log residuals."""
        return pl.DataFrame({
            "batch_size": self.batch_sizes, "steps": self.steps, "fitted": self.fitted,
            "residual_log": self.residuals,
        })


def _no_fit(reason: str, b: np.ndarray | None = None, s: np.ndarray | None = None, **kw: Any) -> TradeoffFit:
    b = np.empty(0) if b is None else b
    s = np.empty(0) if s is None else s
    return TradeoffFit(reason=reason, batch_sizes=b, steps=s, n_points=len(b), **kw)


def _list(values: np.ndarray) -> str:
    return ", ".join(f"{x:g}" for x in sorted(values))


def _points(f: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(batch sizes, steps, rows to fit, warnings): the fit's inputs as best_lr_of marks them (in_fit,
    fit_batch), with the warnings critical_batch_of gives, word for word.

    A row is fitted when it reached the target with a measured crossing (censored rows, already below the
    target at their first point, are left out with a warning), at its effective batch E/S (the batch size
    itself unless the runs followed a batch-size schedule, which gets a warning).
    """
    nominal = column(f, "batch_size")
    s = column(f, "steps")
    reached = flag(f, "reached", default=True)
    cens = flag(f, "censored")
    sched = flag(f, "scheduled")
    if "in_fit" in f.columns:  # best_lr_of's own choice of the fit's points (SQL: the one definition)
        b, keep = column(f, "fit_batch"), flag(f, "in_fit")
    else:  # a hand-built frame: reached rows with steps, at their batch size (or effective batch)
        eff = column(f, "effective_batch")
        b = np.where(np.isfinite(eff), eff, nominal)
        keep = reached & ~cens & np.isfinite(s) & (s > 0) & np.isfinite(b) & (b > 0)
    warnings: list[str] = []
    edge = reached & flag(f, "lr_at_edge") & (column(f, "n_lrs") > 1 if "n_lrs" in f.columns else True)
    if edge.any():
        warnings.append(f"best LR at the edge of the LR grid for B = {_list(nominal[edge])}: "
                        "steps there may be overestimated")
    if cens.any():
        warnings.append(f"B = {_list(nominal[cens])}: already at or below the target at the first point, so steps "
                        "to target are not measured: left out of the fit")
    if (keep & sched).any():
        warnings.append(f"B = {_list(nominal[keep & sched])}: the batch size changes during these runs: "
                        "fitted at the effective batch E/S")
    return b, s, keep, warnings


def fit_tradeoff(
    best: Any,
    *,
    ci: float = 0.90,
    n_boot: int = 1000,
    seed: int = 0,
    min_batches: int = 3,
) -> TradeoffFit:
    """Fit S(B) = S_min + E_min/B to the best steps-to-target per batch size.

    `best`: one row per batch size with batch_size and steps (the output of best_per_batch; a
    `reached` column, if present, selects the rows that reached the target; several rows per batch
    size are reduced to the fewest steps). A residual bootstrap gives the intervals. No fit (with a
    reason) when fewer than `min_batches` batch sizes reached the target, or when the optimum is at
    B_crit -> 0 (steps do not fall with batch size) or B_crit -> inf (steps fall as 1/B all the way:
    perfect scaling, B_crit beyond the largest batch).
    """
    f = as_frame(best, "best")
    require(f, ["batch_size", "steps"], "best")
    if "target" in f.columns and f["target"].n_unique() > 1:
        raise ValueError("best has several targets: filter to one, or use tradeoff_vs_target")
    b, s, keep, warnings = _points(f)
    b, s = by_batch(b[keep], s[keep], "min")
    if len(b) == 0:
        return _no_fit("no batch size reached the target", ci_level=ci, warnings=tuple(warnings))
    if len(b) < min_batches:
        return _no_fit(
            f"only {len(b)} batch size(s) reached the target; the frontier needs at least {min_batches}",
            b, s, ci_level=ci, warnings=tuple(warnings),
        )
    p = fit_profile(b, np.log(s), sign=+1.0, n_boot=n_boot, seed=seed)
    fitted = np.exp(p.fitted)
    common = dict(batch_sizes=b, steps=s, fitted=fitted, residuals=p.residuals, r2=p.r2, rmse_log=p.rmse,
                  n_points=len(b), ci_level=ci, n_boot=len(p.boot_c), warnings=tuple(warnings))
    if p.boundary == "low":
        return TradeoffFit(reason=(
            f"steps to target do not fall with batch size over B = {b.min():g}..{b.max():g}: "
            f"B_crit is below the smallest batch (or the spread is noise)"), **common)
    if p.boundary == "high":
        return TradeoffFit(reason=(
            f"steps fall as 1/B over the whole range B = {b.min():g}..{b.max():g} (perfect scaling): "
            f"B_crit is above the largest batch; sweep larger batches"), **common)
    s_min = float(np.exp(p.a))
    e_min = s_min * p.c
    boot_s = np.exp(p.boot_a)
    with np.errstate(invalid="ignore"):
        boot_e = np.where(np.isfinite(p.boot_c), boot_s * p.boot_c, np.inf)
    b_ci = interval(p.boot_c, ci)
    if not (b.min() <= p.c <= b.max()):
        warnings.append(f"B_crit = {p.c:.3g} lies outside the batch sizes measured ({b.min():g}..{b.max():g}): "
                        "extrapolated")
    if p.unbounded:
        warnings.append("the data do not bound B_crit on one side (90 % profile interval reaches the grid end)")
    if len(b) == min_batches == 3:
        warnings.append("only 3 batch sizes: one degree of freedom, treat the interval with care")
    common["warnings"] = tuple(warnings)
    return TradeoffFit(
        b_crit=float(p.c), s_min=s_min, e_min=float(e_min), b_crit_ci=b_ci,
        s_min_ci=interval(np.where(np.isnan(boot_s), 0.0, boot_s), ci), e_min_ci=interval(boot_e, ci), **common,
    )


def tradeoff_vs_target(
    hits: Any,
    runs: Any | None = None,
    *,
    ci: float = 0.90,
    n_boot: int = 300,
    seed: int = 0,
    min_batches: int = 3,
    rtol: float = 0.0,
    targets: Sequence[float] | None = None,
) -> pl.DataFrame:
    """B_crit for each target next to the measured B_simple where the runs reached that target.

    `hits`: steps_to_target(..., target=[t1, t2, ...]) or the SQL macro ``crossings`` (with b_simple,
    g2, trace_sigma, n_noise columns for the noise side). Per target, the frontier is fitted to the best
    LR per batch size; B_simple is measured over those same best runs: `b_simple` pools them (ratio of
    summed tr(Sigma) and |G|^2 estimates), `b_simple_median`, `_q25`, `_q75` summarize the per-run values.
    McCandlish et al. expect B_crit ~ B_noise >= B_simple and both to grow as the loss falls.

    Columns: target, b_crit, b_crit_lo, b_crit_hi, s_min, e_min, r2, n_batches, b_simple,
    b_simple_median, b_simple_q25, b_simple_q75, n_noise_runs, reason, warnings.
    """
    best = best_per_batch(hits, runs, rtol=rtol)
    if "target" not in best.columns:
        best = best.with_columns(target=pl.lit(NAN))
    wanted = sorted(set(best["target"].to_list()) if targets is None else set(targets), reverse=True)
    parts = {k[0]: v for k, v in best.partition_by("target", as_dict=True).items()}
    rows = []
    for t in wanted:
        sub = parts.get(t, best.clear())
        fit = fit_tradeoff(sub, ci=ci, n_boot=n_boot, seed=seed, min_batches=min_batches)
        ok = flag(sub, "reached") & ~flag(sub, "censored") & (column(sub, "n_noise") > 0)
        per_run = column(sub, "b_simple")[ok]
        per_run = per_run[np.isfinite(per_run)]
        q = np.quantile(per_run, [0.25, 0.5, 0.75]) if per_run.size else np.full(3, NAN)
        n = column(sub, "n_noise")[ok]
        g, tr = float((column(sub, "g2")[ok] * n).sum()), float((column(sub, "trace_sigma")[ok] * n).sum())
        rows.append({
            "target": float(t), "b_crit": fit.b_crit, "b_crit_lo": fit.b_crit_ci[0], "b_crit_hi": fit.b_crit_ci[1],
            "s_min": fit.s_min, "e_min": fit.e_min, "r2": fit.r2, "n_batches": fit.n_points,
            "b_simple": tr / g if ok.any() and g != 0 else NAN,
            "b_simple_median": float(q[1]), "b_simple_q25": float(q[0]), "b_simple_q75": float(q[2]),
            "n_noise_runs": int(ok.sum()), "reason": fit.reason, "warnings": list(fit.warnings),
        })
    schema = {"target": pl.Float64, "b_crit": pl.Float64, "b_crit_lo": pl.Float64, "b_crit_hi": pl.Float64,
              "s_min": pl.Float64, "e_min": pl.Float64, "r2": pl.Float64, "n_batches": pl.Int64,
              "b_simple": pl.Float64, "b_simple_median": pl.Float64, "b_simple_q25": pl.Float64,
              "b_simple_q75": pl.Float64, "n_noise_runs": pl.Int64, "reason": pl.String,
              "warnings": pl.List(pl.String)}
    return pl.DataFrame(rows, schema=schema)
