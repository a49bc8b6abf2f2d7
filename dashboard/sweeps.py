"""Glue between the store (queries) and the fits (analysis) for a set of runs, cached by store version.

Heavy per-step reductions happen in DuckDB (queries.bucketed_steps, queries.noise_steps); every number
comes from dashboard.analysis. Results are memoized with queries.cached, so moving a slider re-runs
only the cheap fits, and a write to the store invalidates everything at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from dashboard import analysis, queries

TARGET_METRICS = {"train_loss": "train loss", "test_loss": "test loss"}


def auto_smoothing(lengths: pl.DataFrame) -> int:
    """Bucket width (steps) for steps-to-target: about 1/200 of the median run, between 1 and 100."""
    if lengths.is_empty():
        return 1
    med = float(lengths["last"].median() or 1)
    return int(min(100, max(1, round(med / 200))))


@queries.cached_by_runs
def curves_for_targets(db: Path, run_ids: Sequence[str], metric: str = "train_loss") -> tuple[pl.DataFrame, pl.DataFrame | None, int]:
    """(steps-like frame, evals frame or None, smoothing) to hand to analysis.steps_to_target."""
    ids = sorted(run_ids)
    if metric == "train_loss":
        width = auto_smoothing(queries.run_lengths(db, ids))
        return queries.bucketed_steps(db, ids, width), None, width
    return None, queries.evals_frame(db, ids), 1


@dataclass(frozen=True)
class TargetRange:
    lo: float
    hi: float
    default: float
    higher_is_better: bool = False


@queries.cached_by_runs
def target_range(db: Path, run_ids: Sequence[str], metric: str = "train_loss") -> TargetRange | None:
    """Slider bounds and the default target: a loss every batch size reached (with its best run) by half-way
    through training."""
    steps, evals, width = curves_for_targets(db, run_ids, metric)
    curve, higher = analysis.metric_curve(steps, evals, metric)
    sm = analysis.smooth_steps(curve, 1, value="value").filter(pl.col("value").is_finite())
    if sm.is_empty():
        return None
    runs = queries.runs_frame(db, run_ids).select("run_id", "diverged", "status", "batch_size")
    per = sm.sort("step").group_by("run_id").agg(
        best=pl.col("value").min(),
        first=pl.col("value").first(),
        mid=pl.col("value").filter(pl.col("step") >= pl.col("step").max() / 2).cum_min().first(),
    )
    per = per.join(runs, on="run_id", how="left").filter(~pl.col("diverged").fill_null(False))
    if per.is_empty():
        return None
    # The frontier compares batch sizes each at its best LR, so the default target is a loss that every
    # batch size reached with at least one of its runs (a run with a hopeless LR does not pin the target
    # at the starting loss) -- and reached by half-way through that run, so the crossing is not decided
    # by noise on the final plateau. The slider goes down to where 3 batch sizes still reach it.
    agg = per.group_by("batch_size").agg(pl.col("best").min(), pl.col("mid").min())
    default = float(agg["mid"].max())
    bests = sorted(agg["best"].to_list())
    lo = float(bests[min(2, len(bests) - 1)])
    hi = float(per["first"].median())
    if not hi > lo:
        hi = lo * 1.5 if lo > 0 else lo + 1.0
    default = min(max(default, lo), hi)
    return TargetRange(lo=lo, hi=hi, default=default, higher_is_better=higher)


@queries.cached_by_runs
def hits_for(db: Path, run_ids: Sequence[str], targets: Sequence[float], metric: str = "train_loss") -> pl.DataFrame:
    """analysis.steps_to_target for the runs and targets, with B_simple measured around each best run's
    crossing (analysis.noise_at over that run's raw gradient-noise steps)."""
    ids = sorted(run_ids)
    steps, evals, width = curves_for_targets(db, ids, metric)
    runs = queries.runs_frame(db, ids)
    # the steps arrive already averaged over `width` steps (queries.bucketed_steps): no second smoothing
    hits = analysis.steps_to_target(steps, list(targets), metric=metric, smoothing=1, evals=evals, runs=runs)
    # B_simple only matters for the fastest run of each batch size's best LR: measure just those
    best = analysis.best_per_batch(hits)
    best_ids = sorted({r for r in best["run_id"].drop_nulls().to_list()})
    if best_ids:
        measured = noise_steps_of(db, best_ids)
        if not measured.is_empty():
            mine = pl.col("run_id").is_in(best_ids)
            with_noise = analysis.noise_at(measured, hits.filter(mine))
            hits = pl.concat([hits.filter(~mine), with_noise], how="diagonal_relaxed")
    return hits


def noise_steps_of(db: Path, run_ids: Sequence[str]) -> pl.DataFrame:
    """Raw gradient-noise steps of a few runs (queries.noise_steps caches them per finished run, so moving
    the target, which mostly keeps the same best runs, reads little or nothing)."""
    return queries.noise_steps(db, sorted(set(run_ids)), per_run_rows=50_000)


@queries.cached_by_runs
def vs_target(db: Path, run_ids: Sequence[str], targets: Sequence[float], metric: str = "train_loss") -> pl.DataFrame:
    """analysis.tradeoff_vs_target over a grid of targets (does not depend on the slider: cached)."""
    return analysis.tradeoff_vs_target(hits_for(db, run_ids, tuple(targets), metric), n_boot=300)


def target_grid(tr: TargetRange, n: int = 10) -> list[float]:
    """Targets from the default (every run reached it) to near the best loss reached, log-spaced."""
    lo = tr.lo + 0.05 * (tr.default - tr.lo)
    if tr.higher_is_better or lo <= 0 or tr.default <= 0:
        return [float(x) for x in np.linspace(tr.default, lo, n)]
    return [float(x) for x in np.geomspace(tr.default, lo, n)]


def snap(x: float) -> float:
    """A target rounded to 3 significant figures (what the page shows, so the cache keys are stable)."""
    if x == 0 or not np.isfinite(x):
        return float(x)
    return float(f"{x:.3g}")
