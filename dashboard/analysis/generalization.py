"""The generalization gap across batch sizes (Keskar et al. 2016) and the SGD noise scale (Smith et al. 2017).

Gap = test - train loss (and train - test accuracy) per run, compared at *matched* training progress.
The default reads every run where its training loss (on the fixed train-split evaluation) first reaches
the same level, the lowest level every batch size reached: Keskar et al. compare minima of similar
training loss, and at matched examples a large-batch run has taken few steps and barely trained, so its
small gap says "under-fitted", not "generalizes well". Matched examples (the most that all finished runs
reached) and end of training are offered beside it. Smith & Le's noise scale g = eps*N / (B*(1 - m)) puts LR, batch size and momentum on
one axis; runs with the same g are predicted to generalize alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import spearmanr

from dashboard.analysis.frames import as_frame, floats, require, run_meta

_NAN = float("nan")


@dataclass(frozen=True)
class Generalization:
    """Result of generalization().

    per_run: run_id, batch_size, lr, momentum, train_size, status, examples, epochs (where read),
    train_loss, test_loss, gap_loss, train_accuracy, test_accuracy, gap_accuracy, noise_g.
    by_batch: per batch size, medians of the gaps, losses, accuracies and g, and n_runs.
    rho_batch / p_batch and rho_noise / p_noise: Spearman rank correlation of gap_loss with batch
    size and with g (NaN when fewer than 3 runs or no spread). `at` says where the runs were read.
    """

    per_run: pl.DataFrame
    by_batch: pl.DataFrame
    at: str = ""
    rho_batch: float = _NAN
    p_batch: float = _NAN
    rho_noise: float = _NAN
    p_noise: float = _NAN
    reason: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.reason is None


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    m = np.isfinite(x) & np.isfinite(y)
    if m.sum() < 3 or np.unique(x[m]).size < 2 or np.unique(y[m]).size < 2:
        return _NAN, _NAN
    r = spearmanr(x[m], y[m])
    return float(r.statistic), float(r.pvalue)


def _read_at(ev: pl.DataFrame, where: pl.DataFrame) -> pl.DataFrame:
    """Interpolate loss/accuracy of each (run_id, split) at x = where.x (linear in examples, no extrapolation)."""
    q = where.sort("x")
    e = ev.sort("examples")
    back = q.join_asof(e, left_on="x", right_on="examples", by=["run_id", "split"], strategy="backward",
                       check_sortedness=False)
    fwd = q.join_asof(e, left_on="x", right_on="examples", by=["run_id", "split"], strategy="forward",
                      check_sortedness=False)
    j = back.join(fwd, on=["run_id", "split", "x"], suffix="_f")
    w = pl.when(pl.col("examples_f") > pl.col("examples")).then(
        (pl.col("x") - pl.col("examples")) / (pl.col("examples_f") - pl.col("examples"))
    ).otherwise(0.0)
    return j.select(
        "run_id", "split", "x",
        (pl.col("loss") + w * (pl.col("loss_f") - pl.col("loss"))).alias("loss"),
        (pl.col("accuracy") + w * (pl.col("accuracy_f") - pl.col("accuracy"))).alias("accuracy"),
    )


def _at_train_loss(train: pl.DataFrame, m: pl.DataFrame, level: float | None,
                   runs: Any) -> tuple[pl.DataFrame, str, list[str]]:
    """Runs `m` with x = the examples where their train-split loss first reaches `level` (interpolated)."""
    warnings: list[str] = []
    r = as_frame(runs, "runs")
    if "outcome" in r.columns:
        stalled = r.filter(pl.col("outcome") == "stalled")["run_id"].cast(pl.String).to_list()
        n = m.filter(pl.col("run_id").is_in(stalled)).height
        if n:
            warnings.append(f"{n} stalled run(s) left out: they never left their initial loss")
        m = m.filter(~pl.col("run_id").is_in(stalled))
    tr = train.filter(pl.col("run_id").is_in(m["run_id"].implode())).sort("run_id", "examples")
    if tr.is_empty():
        return m.clear().with_columns(x=pl.lit(None, dtype=pl.Float64)), "matched training loss", warnings
    lowest = tr.group_by("run_id").agg(pl.col("loss").min(), pl.col("batch_size").first())
    if level is None:  # the lowest level every batch size reached with at least one run
        level = float(lowest.group_by("batch_size").agg(pl.col("loss").min())["loss"].max())
    short = lowest.filter(pl.col("loss") > level)["run_id"].to_list()
    if short:
        warnings.append(f"{len(short)} run(s) left out: their training loss never reached {level:.3g}")
    tr = tr.with_columns(prev_loss=pl.col("loss").shift(1).over("run_id"),
                         prev_x=pl.col("examples").shift(1).over("run_id"))
    first = tr.filter(pl.col("loss") <= level).group_by("run_id").agg(pl.all().sort_by("examples").first())
    frac = (pl.col("prev_loss") - level) / (pl.col("prev_loss") - pl.col("loss"))
    first = first.with_columns(x=pl.when(pl.col("prev_x").is_null() | (pl.col("prev_loss") == pl.col("loss")))
                               .then(pl.col("examples"))
                               .otherwise(pl.col("prev_x") + frac * (pl.col("examples") - pl.col("prev_x"))))
    early = first.filter(pl.col("prev_x").is_null()).height
    if early:
        warnings.append(f"{early} run(s) were already below {level:.3g} at their first evaluation: read there")
    m = m.join(first.select("run_id", "x"), on="run_id", how="inner")
    return m, f"training loss {level:.3g}", warnings


def generalization(
    evals: Any,
    runs: Any,
    *,
    at: str | float = "train_loss",
    loss_level: float | None = None,
    train_split: str = "train",
    test_split: str = "test",
    include_diverged: bool = False,
) -> Generalization:
    """Generalization gap per run and per batch size, at matched progress or at the end of training.

    at="train_loss" (default): every run where its train-split evaluation loss first reaches `loss_level`
    (default: the lowest level every batch size reached with one of its runs), interpolated in examples between evaluations;
    runs that stalled (runs.outcome, SQL run_outcomes) are left out, with a warning.
    at="matched": every run at the same number of examples, the most that all finished runs reached
    (runs that stopped short are left out); at="end": each run's last evaluation with both splits;
    at=<float>: that many epochs (examples = epochs * train_size). Diverged runs (status or non-finite
    evaluations) are left out unless include_diverged=True.
    """
    ev = floats(as_frame(evals, "evals"), ["examples", "loss", "accuracy"])
    require(ev, ["run_id", "step", "split", "loss"], "evals")
    meta = run_meta(runs)
    empty = pl.DataFrame()
    if "accuracy" not in ev.columns:
        ev = ev.with_columns(accuracy=pl.lit(None, dtype=pl.Float64))
    ev = ev.filter(pl.col("split").is_in([train_split, test_split]))
    ev = ev.join(meta.select("run_id", "batch_size"), on="run_id", how="left")
    if "examples" not in ev.columns:
        ev = ev.with_columns(examples=pl.lit(None, dtype=pl.Float64))
    ev = ev.with_columns(examples=pl.coalesce(pl.col("examples"), pl.col("step") * pl.col("batch_size")))
    bad = ev.group_by("run_id").agg(nonfinite=(~pl.col("loss").is_finite()).fill_null(True).any())
    ev = ev.filter(pl.col("loss").is_finite().fill_null(False) & pl.col("examples").is_not_null())
    both = ev.group_by("run_id", "step").agg(pl.col("split").n_unique().alias("k"), pl.col("examples").max())
    both = both.filter(pl.col("k") == 2)
    if both.height == 0:
        return Generalization(empty, empty, reason=f"no evaluations with both '{train_split}' and '{test_split}' splits")
    m = meta.join(bad, on="run_id", how="left").with_columns(
        diverged=(pl.col("status") == "diverged").fill_null(False) | pl.col("nonfinite").fill_null(False)
    )
    if not include_diverged:
        m = m.filter(~pl.col("diverged"))
    last = both.group_by("run_id").agg(pl.col("examples").max().alias("x_end"))
    m = m.join(last, on="run_id", how="inner")
    if m.height == 0:
        what = "run" if include_diverged else "run that did not diverge"
        return Generalization(empty, empty, reason=f"no {what} has evaluations with both splits")
    warnings: list[str] = []
    if at == "train_loss":
        m, label, more = _at_train_loss(ev.filter(pl.col("split") == train_split), m, loss_level, runs)
        warnings += more
    elif at == "end":
        m = m.with_columns(x=pl.col("x_end"))
        label = "end of training"
    elif at == "matched":
        finished = m.filter(pl.col("status").is_null() | (pl.col("status") == "finished"))
        pool = finished if finished.height else m
        x_star = float(pool["x_end"].min())
        short = m.filter(pl.col("x_end") < x_star).height
        if short:
            warnings.append(f"{short} unfinished run(s) left out: they have not reached {x_star:g} examples")
        m = m.filter(pl.col("x_end") >= x_star).with_columns(x=pl.lit(x_star))
        sizes = m["train_size"].drop_nulls().unique()
        label = f"{x_star:g} examples" + (f" ({x_star / sizes[0]:.3g} epochs)" if sizes.len() == 1 else "")
    else:
        epochs = float(at)
        m = m.with_columns(x=pl.col("train_size") * epochs)
        missing = m.filter(pl.col("x").is_null() | (pl.col("x") > pl.col("x_end"))).height
        if missing:
            warnings.append(f"{missing} run(s) left out: no train_size, or they stopped before {epochs:g} epochs")
        m = m.filter(pl.col("x").is_not_null() & (pl.col("x") <= pl.col("x_end")))
        label = f"{epochs:g} epochs"
    if m.height == 0:
        return Generalization(empty, empty, at=label, reason="no run has evaluations at that point",
                              warnings=tuple(warnings))
    where = m.select("run_id", "x").join(pl.DataFrame({"split": [train_split, test_split]}), how="cross")
    vals = _read_at(ev.select("run_id", "split", "examples", "loss", "accuracy"), where)
    tr = vals.filter(pl.col("split") == train_split).select(
        "run_id", pl.col("loss").alias("train_loss"), pl.col("accuracy").alias("train_accuracy"))
    te = vals.filter(pl.col("split") == test_split).select(
        "run_id", pl.col("loss").alias("test_loss"), pl.col("accuracy").alias("test_accuracy"))
    per = (
        m.select("run_id", "batch_size", "lr", "momentum", "train_size", "status", pl.col("x").alias("examples"))
        .join(tr, on="run_id", how="left").join(te, on="run_id", how="left")
        .with_columns(
            epochs=pl.col("examples") / pl.col("train_size"),
            gap_loss=pl.col("test_loss") - pl.col("train_loss"),
            gap_accuracy=pl.col("train_accuracy") - pl.col("test_accuracy"),
            noise_g=pl.col("lr") * pl.col("train_size")
            / (pl.col("batch_size") * (1.0 - pl.col("momentum").fill_null(0.0))),
        )
        .with_columns(noise_g=pl.when(pl.col("momentum").fill_null(0.0) < 1.0).then(pl.col("noise_g")))
        .sort("batch_size", "lr")
    )
    by_batch = per.group_by("batch_size").agg(
        n_runs=pl.len(),
        gap_loss=pl.col("gap_loss").median(), gap_accuracy=pl.col("gap_accuracy").median(),
        train_loss=pl.col("train_loss").median(), test_loss=pl.col("test_loss").median(),
        test_accuracy=pl.col("test_accuracy").median(), noise_g=pl.col("noise_g").median(),
    ).sort("batch_size")
    gap = per["gap_loss"].to_numpy().astype(float)
    rb, pb = _spearman(per["batch_size"].to_numpy().astype(float), gap)
    rn, pn = _spearman(per["noise_g"].fill_null(np.nan).to_numpy().astype(float), gap)
    return Generalization(per, by_batch, at=label, rho_batch=rb, p_batch=pb, rho_noise=rn, p_noise=pn,
                          warnings=tuple(warnings))
