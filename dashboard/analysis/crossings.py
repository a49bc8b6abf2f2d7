"""Steps and examples to a target: where each run's smoothed metric first reaches a value.

Smoothing is by *buckets*: consecutive, non-overlapping blocks of `smoothing` steps (steps 1..w,
w+1..2w, ...), each represented by its centroid (mean step, mean examples, mean metric over the finite
values in it). Why buckets rather than a trailing average: a bucket mean is what a training loop logs
when it reports "mean loss over the last w steps", it carries no lag (the centroid sits in the middle
of the values averaged), and it is a plain GROUP BY, so the SQL macro `crossings` in
schema/sql/20_analysis.sql computes exactly the same numbers over millions of steps without a window
sort. smoothing=1 is the raw metric.

The crossing is the first bucket at or below the target, linearly interpolated in (step, examples)
between that bucket's centroid and the previous one's; E is the interpolated cumulative examples, so
batch-size schedules are handled (E != B*S). Runs that never reach the target are reported with
reached=False and a reason, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from dashboard.analysis.frames import as_frame, attach_runs, floats, require
from dashboard.analysis.noise import INGREDIENTS, noise_at

UNFINISHED = ("running", "stale")


def metric_curve(steps: Any | None, evals: Any | None, metric: str) -> tuple[pl.DataFrame, bool]:
    """(run_id, step, examples, value) for a metric name, and whether higher values are better.

    "train_loss" is the per-step training loss from `steps`; "<split>_loss" and "<split>_accuracy"
    come from `evals` rows of that split (e.g. "test_loss", "train_accuracy").
    """
    if metric == "train_loss" and steps is not None:
        f = as_frame(steps, "steps")
        require(f, ["run_id", "step", "loss"], "steps")
        col, higher = "loss", False
    else:
        split, _, kind = metric.rpartition("_")
        if kind not in ("loss", "accuracy") or not split:
            raise ValueError(f"metric must be 'train_loss' or '<split>_loss' / '<split>_accuracy', not {metric!r}")
        if evals is None:
            raise ValueError(f"metric {metric!r} needs evals=")
        f = as_frame(evals, "evals")
        require(f, ["run_id", "step", "split", kind], "evals")
        f = f.filter(pl.col("split") == split)
        col, higher = kind, kind == "accuracy"
    if "examples" not in f.columns:
        f = f.with_columns(examples=pl.lit(None, dtype=pl.Float64))
    out = f.select(
        pl.col("run_id").cast(pl.String),
        pl.col("step").cast(pl.Float64),  # float: pre-bucketed curves carry centroid steps
        pl.col("examples").cast(pl.Float64),
        pl.col(col).cast(pl.Float64).alias("value"),
    )
    return out, higher


def smooth_steps(curve: Any, smoothing: int = 1, value: str = "loss") -> pl.DataFrame:
    """Bucket means of a per-step curve: one row per (run_id, bucket) with step, examples and `value`
    at the centroid of the finite values in the bucket, and n (how many). bucket = floor((step-1)/w).
    A curve that is already bucketed (float centroid steps, e.g. from the SQL macro) passes through
    unchanged at smoothing=1.

    The same as the SQL macro ``smoothed_steps(width)``. Non-finite values are left out of the means;
    buckets with none are dropped.
    """
    if int(smoothing) != smoothing or smoothing < 1:
        raise ValueError("smoothing must be a whole number of steps >= 1")
    width = int(smoothing)
    f = floats(as_frame(curve, "curve"), [value, "examples"])
    require(f, ["run_id", "step", value], "curve")
    if "examples" not in f.columns:
        f = f.with_columns(examples=pl.lit(None, dtype=pl.Float64))
    f = f.filter(pl.col(value).is_finite().fill_null(False))
    bucket = ((pl.col("step").cast(pl.Float64) - 1) / width).floor().cast(pl.Int64).alias("bucket")
    if width == 1:
        out = f.select(
            "run_id", bucket, pl.col("step").cast(pl.Float64), "examples", value, pl.lit(1, pl.UInt32).alias("n")
        )
    else:
        out = f.group_by("run_id", bucket).agg(
            pl.col("step").cast(pl.Float64).mean(),
            pl.col("examples").mean(),
            pl.col(value).mean(),
            pl.len().alias("n"),
        )
    return out.sort("run_id", "bucket")


def _as_targets(target: float | Sequence[float]) -> list[float]:
    targets = [float(target)] if np.isscalar(target) else [float(t) for t in target]
    if not targets or not all(np.isfinite(targets)):
        raise ValueError("target(s) must be finite numbers")
    return sorted(set(targets), reverse=True)


def steps_to_target(
    steps: Any | None,
    target: float | Sequence[float],
    *,
    metric: str = "train_loss",
    smoothing: int = 1,
    evals: Any | None = None,
    runs: Any | None = None,
    noise_window: float = 0.25,
) -> pl.DataFrame:
    """Per run and target: the interpolated step S and examples E where the smoothed metric first
    reaches the target (loss at or below it; accuracy at or above it).

    Columns: run_id, target, reached, steps, examples, hit_value (smoothed metric in the bucket that
    reached it), best_value, final_value (best / last smoothed value), last_step, diverged (a
    non-finite value was logged, or runs.status says so), b_simple / g2 / trace_sigma / n_noise (the
    noise scale over the measured steps in [S/(1+noise_window), S*(1+noise_window)], see
    noise.noise_at; NULL without the ingredients), reason (why not reached; NULL when reached), plus batch_size, lr, sweep, status, ...
    when `runs` is given. Every run in `runs` (or in the curve) appears once per target.
    """
    targets = _as_targets(target)
    curve, higher = metric_curve(steps, evals, metric)
    sign = -1.0 if higher else 1.0  # work on a "lower is better" value throughout
    curve = curve.with_columns(pl.col("value") * sign)
    buckets = smooth_steps(curve, smoothing, value="value")
    buckets = buckets.with_columns(
        prev_step=pl.col("step").shift(1).over("run_id"),
        prev_examples=pl.col("examples").shift(1).over("run_id"),
        prev_value=pl.col("value").shift(1).over("run_id"),
        _prev_min=pl.col("value").cum_min().shift(1).over("run_id"),
    )
    per_run = curve.group_by("run_id").agg(
        last_step=pl.col("step").max(),
        diverged=(~pl.col("value").is_finite()).fill_null(False).any(),
    )
    stats = buckets.group_by("run_id").agg(
        best_value=pl.col("value").min(), final_value=pl.col("value").sort_by("bucket").last()
    )
    per_run = per_run.join(stats, on="run_id", how="left")
    ids = per_run.select("run_id")
    if runs is not None:
        ids = pl.concat([as_frame(runs, "runs").select(pl.col("run_id").cast(pl.String)), ids]).unique(
            maintain_order=True
        )
    grid = ids.join(pl.DataFrame({"target": [t * sign for t in targets]}), how="cross")

    # the first bucket at/below a target is a running-minimum record; among records (strictly falling
    # values) the one with the largest value <= target is the earliest, found by an as-of join
    records = buckets.filter(pl.col("_prev_min").is_null() | (pl.col("value") < pl.col("_prev_min")))
    hits = grid.sort("target").join_asof(
        records.sort("value").select(
            "run_id", "step", "examples", "value", "prev_step", "prev_examples", "prev_value",
            pl.col("value").alias("hit_value"),
        ),
        left_on="target", right_on="value", by="run_id", strategy="backward", check_sortedness=False,
    )
    frac = (pl.col("prev_value") - pl.col("target")) / (pl.col("prev_value") - pl.col("hit_value"))
    interp = lambda a, b: pl.when(pl.col("prev_step").is_null()).then(pl.col(b)).otherwise(  # noqa: E731
        pl.col(a) + frac * (pl.col(b) - pl.col(a))
    )
    hits = hits.with_columns(
        reached=pl.col("hit_value").is_not_null(),
        steps=interp("prev_step", "step"),
        examples=interp("prev_examples", "examples"),
    ).select("run_id", "target", "reached", "steps", "examples", "hit_value")
    out = hits.join(per_run, on="run_id", how="left").with_columns(
        pl.col("diverged").fill_null(False), pl.col("target") * sign, pl.col("hit_value") * sign,
        pl.col("best_value") * sign, pl.col("final_value") * sign,
    )
    out = attach_runs(out, runs)
    if "status" in out.columns:
        out = out.with_columns(diverged=pl.col("diverged") | (pl.col("status") == "diverged").fill_null(False))

    has_noise = steps is not None and all(c in as_frame(steps, "steps").columns for c in INGREDIENTS)
    if has_noise:
        out = noise_at(steps, out, rel_window=noise_window)
    else:
        out = out.with_columns(
            [pl.lit(None, dtype=pl.Float64).alias(c) for c in ("b_simple", "g2", "trace_sigma")],
            n_noise=pl.lit(0, dtype=pl.Int64),
        )
    return _with_reason(out, metric).sort("target", "run_id", descending=[not higher, False])


def _with_reason(out: pl.DataFrame, metric: str) -> pl.DataFrame:
    best = pl.col("best_value").round_sig_figs(4).cast(pl.String)
    status = pl.col("status") if "status" in out.columns else pl.lit(None, dtype=pl.String)
    reason = (
        pl.when(pl.col("reached")).then(None)
        .when(pl.col("last_step").is_null()).then(pl.lit(f"no {metric} logged"))
        .when(pl.col("best_value").is_null()).then(pl.lit(f"no finite {metric}"))
        .when(pl.col("diverged")).then(pl.lit("diverged before reaching the target (best ") + best + ")")
        .when(status.is_in(list(UNFINISHED)).fill_null(False))
        .then(pl.lit("still running (best so far ") + best + ")")
        .otherwise(pl.lit("never reached the target (best ") + best + ")")
    )
    return out.with_columns(reason=reason)
