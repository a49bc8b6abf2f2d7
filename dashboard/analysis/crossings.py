"""Steps and examples to a target, and the smoothed loss, from frames: the SQL macros run over them.

The definitions live once, in schema/sql/20_analysis.sql (`smoothed_loss`, `crossings`); these functions
run those macros over frames shaped like the store's tables (schema.frames.evaluate), so a notebook, the
pages and a SQL user get the same numbers.

Smoothing is over a fixed number of *examples* (`smoothing_examples`): bucket means over
floor((examples - 1) / width) at their centroid. A bucket of a batch-1024 run then averages as many
examples as a bucket of a batch-8 run, so every batch size's crossing is read through the same amount of
gradient noise (buckets of a fixed number of *steps* smooth small batches far less than large ones).
0 keeps the raw points. A run already at or below the target at its first point has no measured
crossing: it comes back `censored` with the reason, not as a crossing at its first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from dashboard.analysis.frames import as_frame, require
from schema.frames import evaluate

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
        split, _, kind = _split_metric(metric)
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
        pl.col("step").cast(pl.Float64),
        pl.col("examples").cast(pl.Float64),
        pl.col(col).cast(pl.Float64).alias("value"),
    )
    return out, higher


def _split_metric(metric: str) -> tuple[str, str, str]:
    split, sep, kind = metric.rpartition("_")
    if metric != "train_loss" and (kind not in ("loss", "accuracy") or not split):
        raise ValueError(f"metric must be 'train_loss' or '<split>_loss' / '<split>_accuracy', not {metric!r}")
    return split, sep, kind


def _width(smoothing_examples: float) -> float:
    if not np.isfinite(smoothing_examples) or smoothing_examples < 0:
        raise ValueError("smoothing_examples must be a number of examples >= 0 (0: no smoothing)")
    return float(smoothing_examples)


def smooth_steps(steps: Any, smoothing_examples: float = 0, *, metric: str = "train_loss",
                 evals: Any | None = None) -> pl.DataFrame:
    """The smoothed metric (SQL `smoothed_loss`): per (run_id, bucket) the centroid step and examples, the
    mean finite value and n, over buckets of `smoothing_examples` examples (0: the raw points)."""
    _split_metric(metric)
    if metric == "train_loss":
        require(as_frame(steps, "steps"), ["run_id", "step", "loss"], "steps")
    return evaluate(
        "SELECT * FROM smoothed_loss(width_examples := $w, metric := $m) ORDER BY run_id, bucket",
        {"w": _width(smoothing_examples), "m": metric}, steps=steps, evals=evals,
    )


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
    smoothing_examples: float = 0,
    evals: Any | None = None,
    runs: Any | None = None,
    noise_window: float | None = 0.1,
) -> pl.DataFrame:
    """Per run and target, the SQL macro `crossings` over these frames: reached, censored, steps, examples
    (interpolated at the first smoothed point at or below the target; at or above for accuracies),
    bound_steps/bound_examples (censored runs), effective_batch, hit/first/best/final_value, last_step,
    diverged, stalled, scheduled, outcome, B_simple at the crossing (b_simple, g2, trace_sigma, n_noise;
    noise_window=None skips it), batch_size, lr, sweep, status and reason. Every run appears once per target.
    """
    targets = _as_targets(target)
    _split_metric(metric)
    if metric == "train_loss":
        if steps is None:
            raise ValueError("metric 'train_loss' needs steps")
        require(as_frame(steps, "steps"), ["run_id", "step", "loss"], "steps")
    elif evals is None:
        raise ValueError(f"metric {metric!r} needs evals=")
    else:
        require(as_frame(evals, "evals"), ["run_id", "step", "split"], "evals")
    if noise_window is not None and noise_window < 0:
        raise ValueError("noise_window must be >= 0")
    return evaluate(
        "SELECT * FROM crossings($t, width_examples := $w, metric := $m, noise_window := $nw)",
        {"t": targets, "w": _width(smoothing_examples), "m": metric, "nw": noise_window},
        steps=steps, evals=evals, runs=runs,
    )
