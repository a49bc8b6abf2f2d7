"""Glue between the store (queries) and the fits (analysis) for a set of runs, cached by the runs' content.

Every per-step quantity comes from the SQL macros through queries (crossings, smoothed_loss, noise_scale:
their one definition); only the fits over a few rows per target (the hyperbola and its bootstrap) run
here, in dashboard.analysis. Moving a slider re-runs only those cheap fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import spearmanr

from dashboard import analysis, queries

TARGET_METRICS = {"train_loss": "train loss", "test_loss": "test loss"}
SMOOTHING_FACTORS = (0, 1, 2, 4, 8)  # loss smoothing offered, in multiples of the largest batch size


def default_smoothing(db: Path, run_ids: Sequence[str], metric: str = "train_loss", factor: float = 1) -> float:
    """Examples per smoothing bucket: `factor` times the largest batch size among the runs, so every run
    averages at least one step and every batch size averages the same number of examples (evaluations,
    on fixed data, are not smoothed)."""
    if metric != "train_loss" or factor <= 0:
        return 0.0
    b = queries.runs_frame(db, run_ids)["batch_size"].drop_nulls()
    return float(factor * b.max()) if b.len() else 0.0


@dataclass(frozen=True)
class TargetRange:
    lo: float  # lowest target where 3 batch sizes still reach it
    hi: float  # median starting value
    default: float  # every batch size reached it by half-way through its best run
    every_batch: float  # the lowest target every batch size reached
    higher_is_better: bool = False


@queries.cached_by_runs
def target_range(db: Path, run_ids: Sequence[str], metric: str = "train_loss",
                 width: float | None = None) -> TargetRange | None:
    """Slider bounds and the default target, on the smoothed loss the crossings use (losses only)."""
    w = default_smoothing(db, run_ids, metric) if width is None else width
    sm = queries.smoothed_loss(db, sorted(run_ids), w, metric).filter(pl.col("value").is_finite())
    if sm.is_empty():
        return None
    outcomes = queries.run_outcomes(db, run_ids).select("run_id", "outcome")
    runs = queries.runs_frame(db, run_ids).select("run_id", "batch_size")
    per = sm.sort("step").group_by("run_id").agg(
        best=pl.col("value").min(),
        first=pl.col("value").first(),
        mid=pl.col("value").filter(pl.col("step") >= pl.col("step").max() / 2).cum_min().first(),
    )
    per = per.join(runs, on="run_id", how="left").join(outcomes, on="run_id", how="left")
    per = per.filter(~pl.col("outcome").is_in(["diverged", "stalled"]).fill_null(False))
    if per.is_empty():
        return None
    # The frontier compares batch sizes each at its best LR, so the default target is a value every batch
    # size reached with at least one of its runs, by half-way through that run (so the crossing is not
    # decided by noise on the final plateau). The slider goes down to where 3 batch sizes still reach it.
    agg = per.group_by("batch_size").agg(pl.col("best").min(), pl.col("mid").min())
    default = float(agg["mid"].max())
    every = float(agg["best"].max())
    bests = sorted(agg["best"].to_list())
    lo = float(bests[min(2, len(bests) - 1)])
    hi = float(per["first"].median())
    if not hi > lo:
        hi = lo * 1.5 if lo > 0 else lo + 1.0
    return TargetRange(lo=lo, hi=hi, default=min(max(default, lo), hi), every_batch=min(max(every, lo), hi))


def hits_for(db: Path, run_ids: Sequence[str], targets: Sequence[float], metric: str = "train_loss",
             width: float | None = None) -> pl.DataFrame:
    """SQL crossings for the runs and targets (smoothing over `width` examples; None: the default), with
    B_simple at the crossing of the best run of each batch size (the runs the fits use)."""
    w = default_smoothing(db, run_ids, metric) if width is None else width
    ids = sorted(run_ids)
    hits = queries.crossings(db, ids, tuple(targets), w, metric, noise_window=None)
    # B_simple matters for the fastest run of each batch size's best LR: read the measured steps of just those
    best = analysis.best_per_batch(hits)
    return queries.with_noise(db, hits, best["run_id"].drop_nulls().unique().to_list())


@queries.cached_by_runs
def vs_target(db: Path, run_ids: Sequence[str], targets: Sequence[float], metric: str = "train_loss",
              width: float | None = None) -> pl.DataFrame:
    """analysis.tradeoff_vs_target over a grid of targets (does not depend on the slider: cached)."""
    return analysis.tradeoff_vs_target(hits_for(db, run_ids, tuple(targets), metric, width), n_boot=300)


def trend(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman rho and p of y against x over the finite pairs (NaN with fewer than 3)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.unique(a[ok]).size < 2 or np.unique(b[ok]).size < 2:
        return float("nan"), float("nan")
    r = spearmanr(a[ok], b[ok])
    return float(r.statistic), float(r.pvalue)


def target_grid(tr: TargetRange, n: int = 10) -> list[float]:
    """Targets from the default down to the lowest one every batch size reached (log-spaced for losses), so
    the B_crit-vs-target trend is not drawn through targets some batch sizes never reached (1 % above it, so
    rounding the target to 3 figures never puts it out of reach)."""
    lo = tr.every_batch * (0.99 if tr.higher_is_better else 1.01)
    if tr.higher_is_better or lo <= 0 or tr.default <= 0:
        return [float(x) for x in np.linspace(tr.default, lo, n)]
    if lo >= tr.default:
        return [float(tr.default)]
    return [float(x) for x in np.geomspace(tr.default, lo, n)]


def snap(x: float) -> float:
    """A target rounded to 3 significant figures (what the page shows, so the cache keys are stable)."""
    if x == 0 or not np.isfinite(x):
        return float(x)
    return float(f"{x:.3g}")
