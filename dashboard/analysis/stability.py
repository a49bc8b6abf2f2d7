"""The learning-rate x batch-size grid (Masters & Luschi 2018): final metric per cell, failures marked.

Masters & Luschi found the best results at batch sizes 2-32 and a wider range of stable LRs there.
Seeing that needs every cell, including the ones that diverged, stalled or have not finished: a missing
cell and a failed one must look different, and a run that never left its initial loss (stalled at chance)
is a failure of its cell, never part of the stable range. Who stalled is decided once, in SQL
(`run_outcomes`, column `outcome`); pass that column in the summary. The base LR eta/B (LR per example) is offered as an
alternative axis: under linear LR scaling, a fixed base LR is one horizontal line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from dashboard.analysis.frames import as_frame, attach_runs, floats

UNFINISHED = ("running", "stale")


@dataclass(frozen=True)
class StabilityMap:
    """Result of stability_map.

    cells: one row per (batch_size, lr): base_lr = lr/batch_size, n_runs, n_ok, n_stalled, n_diverged,
    n_unfinished, n_failed, value (median metric over trained, finite runs), state ("ok", "stalled",
    "diverged", "unfinished", "failed": the best thing any of its runs did, in that order), and
    is_best (best value in its batch size's row).
    by_batch: per batch size, best_lr, best_value, lr_stable_min / lr_stable_max (range of LRs with
    an ok cell, see stable_within) and stable_decades = log10(max/min).
    """

    cells: pl.DataFrame
    by_batch: pl.DataFrame
    metric: str
    lower_is_better: bool
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    def grid(self, axis: str = "lr") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(batch sizes, y values, value matrix, state matrix) for a heatmap; y is `lr` or `base_lr`.

        Matrices are indexed [y, batch]; cells never run hold NaN / "" (not the same as diverged).
        """
        if axis not in ("lr", "base_lr"):
            raise ValueError("axis must be 'lr' or 'base_lr'")
        xs = np.sort(self.cells["batch_size"].unique().to_numpy())
        ys = np.sort(self.cells[axis].unique().to_numpy())
        val = np.full((len(ys), len(xs)), np.nan)
        state = np.full((len(ys), len(xs)), "", dtype=object)
        xi = {x: i for i, x in enumerate(xs)}
        yi = {y: i for i, y in enumerate(ys)}
        for row in self.cells.iter_rows(named=True):
            val[yi[row[axis]], xi[row["batch_size"]]] = np.nan if row["value"] is None else row["value"]
            state[yi[row[axis]], xi[row["batch_size"]]] = row["state"]
        return xs, ys, val, state


def stability_map(
    summary: Any,
    runs: Any | None = None,
    *,
    metric: str = "final_loss",
    lower_is_better: bool | None = None,
    stable_within: float | None = None,
) -> StabilityMap:
    """Build the LR x batch grid from a per-run frame holding `metric` (e.g. the run_summary view:
    final_loss, best_loss, final_test_loss, final_test_accuracy, ...; or steps_to_target output with
    final_value), with batch_size, lr and status (pass `runs` to attach them). A run is diverged when
    its status says so, its `diverged` column is true, or a loss metric is non-finite; stalled when its
    `outcome` column (SQL run_outcomes) says 'stalled'.

    The stable LR range per batch size spans the "ok" cells; with `stable_within=x` only those whose
    value is within a factor (1 + x) of the row's best (losses) or at least (1 - x) times it
    (accuracies), so a run that "finished" without learning (loss stuck at chance) does not widen it.
    """
    f = attach_runs(as_frame(summary, "summary"), runs, needed=["run_id", "batch_size", "lr", metric])
    if "target" in f.columns:
        f = f.unique("run_id", keep="first", maintain_order=True)
    f = floats(f, ["batch_size", "lr", metric])
    higher = ("accuracy" in metric) if lower_is_better is None else not lower_is_better
    if "status" not in f.columns:
        f = f.with_columns(status=pl.lit(None, dtype=pl.String))
    if "diverged" not in f.columns:
        f = f.with_columns(diverged=pl.lit(False))
    if "outcome" not in f.columns:
        f = f.with_columns(outcome=pl.lit(None, dtype=pl.String))
    f = f.filter(pl.col("batch_size").is_finite().fill_null(False) & pl.col("lr").is_finite().fill_null(False))
    if f.height == 0:
        empty = pl.DataFrame()
        return StabilityMap(empty, empty, metric, not higher, reason="no runs with a batch size and an LR")
    val = pl.col(metric)
    nonfinite_loss = (~val.is_finite()).fill_null(False) & (not higher)
    kind = (
        pl.when((pl.col("status") == "diverged").fill_null(False) | pl.col("diverged").fill_null(False)
                | (val.is_not_null() & nonfinite_loss))
        .then(pl.lit("diverged"))
        .when(pl.col("status").is_in(list(UNFINISHED)).fill_null(False)).then(pl.lit("unfinished"))
        .when((pl.col("status") == "failed").fill_null(False)).then(pl.lit("failed"))
        .when((pl.col("outcome") == "stalled").fill_null(False)).then(pl.lit("stalled"))
        .otherwise(pl.lit("ok"))
    )
    f = f.with_columns(_kind=kind)
    good = (pl.col("_kind") == "ok") & val.is_finite().fill_null(False)
    cells = f.group_by("batch_size", "lr").agg(
        n_runs=pl.len(),
        n_ok=good.sum(),
        n_stalled=(pl.col("_kind") == "stalled").sum(),
        n_diverged=(pl.col("_kind") == "diverged").sum(),
        n_unfinished=(pl.col("_kind") == "unfinished").sum(),
        n_failed=(pl.col("_kind") == "failed").sum(),
        value=val.filter(good).median(),
    )
    cells = cells.with_columns(
        base_lr=pl.col("lr") / pl.col("batch_size"),
        state=pl.when(pl.col("n_ok") > 0).then(pl.lit("ok"))
        .when(pl.col("n_stalled") > 0).then(pl.lit("stalled"))
        .when(pl.col("n_diverged") > 0).then(pl.lit("diverged"))
        .when(pl.col("n_unfinished") > 0).then(pl.lit("unfinished"))
        .otherwise(pl.lit("failed")),
    )
    best_val = (pl.col("value").max() if higher else pl.col("value").min()).over("batch_size")
    cells = cells.with_columns(is_best=(pl.col("value") == best_val).fill_null(False)).sort("batch_size", "lr")
    ok = cells.filter(pl.col("state") == "ok")
    if stable_within is not None:
        best_row = (pl.col("value").max() if higher else pl.col("value").min()).over("batch_size")
        near = pl.col("value") >= best_row * (1 - stable_within) if higher else (
            pl.col("value") <= best_row * (1 + stable_within))
        ok = ok.filter(near.fill_null(False))
    best = ok.filter(pl.col("is_best")).group_by("batch_size").agg(
        best_lr=pl.col("lr").first(), best_value=pl.col("value").first()
    )
    rng = ok.group_by("batch_size").agg(lr_stable_min=pl.col("lr").min(), lr_stable_max=pl.col("lr").max())
    by_batch = (
        cells.select("batch_size").unique()
        .join(best, on="batch_size", how="left").join(rng, on="batch_size", how="left")
        .with_columns(stable_decades=(pl.col("lr_stable_max") / pl.col("lr_stable_min")).log10())
        .sort("batch_size")
    )
    cols = ["batch_size", "lr", "base_lr", "n_runs", "n_ok", "n_stalled", "n_diverged", "n_unfinished", "n_failed",
            "value", "state", "is_best"]
    return StabilityMap(cells.select(cols), by_batch, metric, not higher)
