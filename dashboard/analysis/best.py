"""For each batch size, the learning rate that reached the target in the fewest steps.

McCandlish et al. compare batch sizes each at its *own* best learning rate: the tradeoff frontier is the
lower envelope over a sweep's LR grid. Repeated seeds of one (batch size, LR) cell are combined by the
median steps, a seed that never reached the target counting as infinitely slow, so a cell counts as
reached only when more than half its seeds did (one lucky seed does not make an LR "best").
"""

from __future__ import annotations

from typing import Any

import polars as pl

from dashboard.analysis.frames import as_frame, attach_runs, floats

_INF = float("inf")


def best_per_batch(
    hits: Any,
    runs: Any | None = None,
    *,
    rtol: float = 0.0,
    include_diverged: bool = True,
) -> pl.DataFrame:
    """One row per (target, batch size): the best LR and its steps/examples to target.

    `hits` is the output of steps_to_target (or of the SQL macro ``crossings``): run_id, reached,
    steps, examples, with batch_size and lr (or pass `runs` to attach them). Ties: cells within
    `rtol` (relative) of the fewest steps all count as best, and the middle one by LR (the lower of
    the two middles) is chosen, so a flat optimum picks its centre rather than an edge.
    `include_diverged=False` ignores runs that later diverged even if they reached the target first.

    Columns: [target], batch_size, reached, lr, steps, examples, run_id (fastest run of the best
    cell), n_runs, n_reached, n_diverged, n_lrs, lr_min, lr_max (LRs tried), lr_min_reached,
    lr_max_reached (range of LRs whose cell reached the target), lr_at_edge (the best LR is the
    smallest or largest tried, so the true optimum may lie outside the grid), and, where present in
    `hits`, b_simple / g2 / trace_sigma / n_noise of that fastest run. Batch sizes where no LR reached
    the target are kept with reached = false.
    """
    if rtol < 0:
        raise ValueError("rtol must be >= 0")
    f = attach_runs(as_frame(hits, "hits"), runs, needed=["run_id", "reached", "steps", "batch_size", "lr"])
    f = floats(f, ["steps", "examples", "lr", "batch_size"])
    if "examples" not in f.columns:
        f = f.with_columns(examples=pl.lit(None, dtype=pl.Float64))
    if "diverged" not in f.columns:
        f = f.with_columns(diverged=pl.lit(False))
    keys = ["target", "batch_size"] if "target" in f.columns else ["batch_size"]
    f = f.filter(pl.col("batch_size").is_finite().fill_null(False) & pl.col("lr").is_finite().fill_null(False))
    ok = pl.col("reached").fill_null(False) & pl.col("steps").is_finite().fill_null(False)
    if not include_diverged:
        ok = ok & ~pl.col("diverged").fill_null(False)
    f = f.with_columns(_ok=ok, diverged=pl.col("diverged").fill_null(False))
    noise_cols = [c for c in ("b_simple", "g2", "trace_sigma", "n_noise") if c in f.columns]

    cells = (
        f.sort([*keys, "lr", "steps"], nulls_last=True)
        .group_by([*keys, "lr"], maintain_order=True)
        .agg(
            n_runs=pl.len(),
            n_reached=pl.col("_ok").sum(),
            n_diverged=pl.col("diverged").sum(),
            steps=pl.when(pl.col("_ok")).then(pl.col("steps")).otherwise(_INF).median(),
            examples=pl.when(pl.col("_ok")).then(pl.col("examples")).otherwise(_INF).median(),
            run_id=pl.col("run_id").filter(pl.col("_ok")).first(),
            **{c: pl.col(c).filter(pl.col("_ok")).first() for c in noise_cols},
        )
        .with_columns(_cell_ok=2 * pl.col("n_reached") > pl.col("n_runs"))
    )
    # best steps per batch size, then the tie set within rtol, then its middle LR
    cells = cells.with_columns(
        _best=pl.col("steps").filter(pl.col("_cell_ok")).min().over(keys),
    ).with_columns(
        _tied=pl.col("_cell_ok") & (pl.col("steps") <= pl.col("_best") * (1.0 + rtol)),
    )
    tied = cells.filter(pl.col("_tied")).sort([*keys, "lr"])
    tied = tied.with_columns(_rank=pl.int_range(pl.len()).over(keys), _m=pl.len().over(keys))
    best = tied.filter(pl.col("_rank") == (pl.col("_m") - 1) // 2).select(
        *keys, "lr", "steps", "examples", "run_id", *noise_cols
    )
    summary = cells.group_by(keys).agg(
        n_runs=pl.col("n_runs").sum(),
        n_reached=pl.col("n_reached").sum(),
        n_diverged=pl.col("n_diverged").sum(),
        n_lrs=pl.len(),
        lr_min=pl.col("lr").min(),
        lr_max=pl.col("lr").max(),
        lr_min_reached=pl.col("lr").filter(pl.col("_cell_ok")).min(),
        lr_max_reached=pl.col("lr").filter(pl.col("_cell_ok")).max(),
    )
    out = summary.join(best, on=keys, how="left").with_columns(
        reached=pl.col("lr").is_not_null(),
        lr_at_edge=(pl.col("lr") == pl.col("lr_min")) | (pl.col("lr") == pl.col("lr_max")),
    )
    cols = [*keys, "reached", "lr", "steps", "examples", "run_id", "n_runs", "n_reached", "n_diverged",
            "n_lrs", "lr_min", "lr_max", "lr_min_reached", "lr_max_reached", "lr_at_edge", *noise_cols]
    # targets from the highest (easiest) down, then batch sizes ascending
    return out.select(cols).sort(keys, descending=[k == "target" for k in keys])
