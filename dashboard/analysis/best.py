"""For each batch size, the learning rate that reached the target in the fewest steps (SQL `best_lr_of`).

McCandlish et al. compare batch sizes each at its *own* best learning rate: the tradeoff frontier is the
lower envelope over a sweep's LR grid. Seeds of one (batch size, LR) cell are combined by the median
steps, a seed that never reached the target counting as infinitely slow, so a cell counts only when more
than half its seeds got there. The rule lives once in schema/sql/20_analysis.sql; this runs it over a
hits frame (crossings / steps_to_target output, or one built by hand).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from dashboard.analysis.frames import as_frame, attach_runs
from schema.frames import evaluate

# columns best_lr_of reads, with what a hand-built hits frame gets when it lacks them
_DEFAULTS: dict[str, pl.Expr] = {
    "target": pl.lit(float("nan")),
    "censored": pl.lit(False),
    "diverged": pl.lit(False),
    "scheduled": pl.lit(False),
    "examples": pl.lit(None, dtype=pl.Float64),
    "bound_steps": pl.lit(None, dtype=pl.Float64),
    "bound_examples": pl.lit(None, dtype=pl.Float64),
    "b_simple": pl.lit(None, dtype=pl.Float64),
    "g2": pl.lit(None, dtype=pl.Float64),
    "trace_sigma": pl.lit(None, dtype=pl.Float64),
    "n_noise": pl.lit(0, dtype=pl.Int64),
}
_FLOATS = ("target", "steps", "examples", "bound_steps", "bound_examples", "batch_size", "lr", "b_simple", "g2",
           "trace_sigma", "effective_batch")


def best_per_batch(
    hits: Any,
    runs: Any | None = None,
    *,
    rtol: float = 0.0,
    include_diverged: bool = True,
) -> pl.DataFrame:
    """One row per (target, batch size): the best LR and its steps/examples to target.

    Columns (best_lr_of): target, batch_size, reached, censored, scheduled, lr, steps, examples,
    effective_batch, run_id (fastest run of the best cell), n_runs, n_reached, n_censored, n_diverged,
    n_lrs, lr_min, lr_max, lr_min_reached, lr_max_reached, lr_at_edge, b_simple, g2, trace_sigma, n_noise.
    Ties within `rtol` pick the middle LR; include_diverged=False ignores runs that later diverged.
    """
    if rtol < 0:
        raise ValueError("rtol must be >= 0")
    f = as_frame(hits, "hits")
    if runs is not None:  # columns crossings left NULL (it had no runs) come from `runs`
        f = f.drop([c for c in ("batch_size", "lr") if c in f.columns and f[c].null_count() == f.height])
    f = attach_runs(f, runs, needed=["run_id", "reached", "steps", "batch_size", "lr"])
    had_target = "target" in f.columns
    f = f.with_columns([e.alias(c) for c, e in _DEFAULTS.items() if c not in f.columns])
    if "effective_batch" not in f.columns:
        f = f.with_columns(effective_batch=pl.col("batch_size"))
    f = f.with_columns(
        *[pl.col(c).cast(pl.Float64, strict=False) for c in _FLOATS],
        pl.col("run_id").cast(pl.String),
        pl.col("reached", "censored", "diverged", "scheduled").cast(pl.Boolean).fill_null(False),
        pl.col("n_noise").cast(pl.Int64).fill_null(0),
    )
    keep = ["run_id", "target", "reached", "censored", "diverged", "scheduled", "steps", "examples", "bound_steps",
            "bound_examples", "effective_batch", "batch_size", "lr", "b_simple", "g2", "trace_sigma", "n_noise"]
    out = evaluate("SELECT * FROM best_lr_of('hits', rtol := $r, include_diverged := $d)",
                   {"r": float(rtol), "d": bool(include_diverged)}, hits=f.select(keep))
    return out if had_target else out.drop("target")
