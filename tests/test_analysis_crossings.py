"""Steps to target and best LR per batch size: interpolation, smoothing, reasons, ties, degenerate inputs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dashboard.analysis import (
    best_per_batch,
    fit_tradeoff,
    generalization,
    lr_scaling,
    smooth_steps,
    stability_map,
    steps_to_target,
    tradeoff_vs_target,
)
from dashboard.analysis.simulate import sweep


def _steps(rows: dict[str, list]) -> pl.DataFrame:
    """Steps rows for several runs: {run_id: [loss, ...]} with step = 1.., examples = 10*step."""
    parts = []
    for run_id, losses in rows.items():
        n = len(losses)
        parts.append(pl.DataFrame({"run_id": [run_id] * n, "step": list(range(1, n + 1)),
                                   "examples": [10 * i for i in range(1, n + 1)],
                                   "loss": [float(x) for x in losses]}))
    return pl.concat(parts)


def _one(hits: pl.DataFrame, run_id: str, target: float | None = None) -> dict:
    f = hits.filter(pl.col("run_id") == run_id)
    if target is not None:
        f = f.filter(pl.col("target") == target)
    assert f.height == 1
    return f.row(0, named=True)


def test_interpolates_between_logged_points() -> None:
    hits = steps_to_target(_steps({"a": [2.0, 1.5, 1.0, 0.5, 0.4]}), [1.2, 0.45, 2.5])
    a = _one(hits, "a", 1.2)
    assert a["reached"] and a["steps"] == pytest.approx(2.6) and a["examples"] == pytest.approx(26.0)
    assert a["reason"] is None and a["hit_value"] == 1.0
    assert _one(hits, "a", 0.45)["steps"] == pytest.approx(4.5)
    first = _one(hits, "a", 2.5)  # already below at the first point: no measured crossing, and it says so
    assert not first["reached"] and first["censored"] and first["steps"] is None and first["bound_steps"] == 1.0
    assert first["reason"] == "already at or below the target at its first point (step 1): not measured"
    assert hits.columns[:6] == ["run_id", "target", "reached", "censored", "steps", "examples"]


def test_first_crossing_not_the_last() -> None:
    hits = steps_to_target(_steps({"a": [2.0, 0.9, 1.5, 0.8, 0.7]}), 1.0)
    assert _one(hits, "a")["steps"] == pytest.approx(1 + 1.0 / 1.1)


def test_bucket_smoothing_uses_centroids_over_examples() -> None:
    f = _steps({"a": [3.0, 1.0, 2.0, 0.0, 1.0, 1.0]})  # 10 examples per step
    b = smooth_steps(f, 20)
    assert b["value"].to_list() == [2.0, 1.0, 1.0]
    assert b["step"].to_list() == [1.5, 3.5, 5.5]
    assert b["examples"].to_list() == [15.0, 35.0, 55.0]
    # raw crosses 1.5 at step 1.5 (between 3.0 and 1.0); the bucket means cross between centroids 1.5 and 3.5
    assert _one(steps_to_target(f, 1.5, smoothing_examples=20), "a")["steps"] == pytest.approx(2.5)
    with pytest.raises(ValueError):
        smooth_steps(f, -1)


def test_smoothing_averages_the_same_examples_at_every_batch_size() -> None:
    """Buckets hold a fixed number of examples: 8 steps of B = 8 and 1 step of B = 64 for 64 examples."""
    small = pl.DataFrame({"run_id": "s", "step": range(1, 65), "examples": [8 * i for i in range(1, 65)],
                          "loss": 1.0})
    big = pl.DataFrame({"run_id": "b", "step": range(1, 9), "examples": [64 * i for i in range(1, 9)], "loss": 1.0})
    b = smooth_steps(pl.concat([small, big]), 64)
    n = dict(b.group_by("run_id").agg(pl.col("n").max()).iter_rows())
    assert n == {"s": 8, "b": 1}
    assert b.group_by("run_id").len().sort("run_id")["len"].to_list() == [8, 8]


def test_examples_follow_batch_schedules() -> None:
    """E is interpolated from the logged cumulative examples, so E != B*S under a batch schedule."""
    f = pl.DataFrame({"run_id": ["a"] * 4, "step": [1, 2, 3, 4], "examples": [8, 16, 48, 80],
                      "loss": [2.0, 1.5, 1.0, 0.5]})
    a = _one(steps_to_target(f, 1.25), "a")
    assert a["steps"] == pytest.approx(2.5) and a["examples"] == pytest.approx(32.0)


def test_every_run_is_reported_with_a_reason() -> None:
    f = _steps({"ok": [2, 1, 0.5], "slow": [2, 1.8, 1.7], "div": [2, 1.9, float("inf"), float("nan")],
                "nan": [float("nan")] * 3, "live": [2, 1.5], "stuck": [2.3, 2.31, 2.2, 2.29]})
    runs = pl.DataFrame({"run_id": ["ok", "slow", "div", "nan", "live", "empty", "stuck"],
                         "status": ["finished", "finished", "diverged", "failed", "running", "failed", "finished"],
                         "batch_size": [8, 8, 8, 8, 8, 8, 8], "lr": [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 0.01]})
    hits = steps_to_target(f, 0.6, runs=runs)
    assert hits.height == 7
    reasons = dict(zip(hits["run_id"], hits["reason"], strict=True))
    assert reasons["ok"] is None
    assert reasons["slow"].startswith("never reached the target within its budget (best 1.7")
    assert reasons["stuck"] == "stalled: never left its initial loss (2.3 to 2.29)"
    assert _one(hits, "stuck")["stalled"] and _one(hits, "stuck")["outcome"] == "stalled"
    assert reasons["div"].startswith("diverged before reaching")
    assert reasons["nan"] == "no finite train_loss"
    assert reasons["live"].startswith("still running")
    assert reasons["empty"] == "no train_loss logged"
    assert _one(hits, "div")["diverged"] and not _one(hits, "slow")["diverged"]
    assert hits.filter(~pl.col("reached"))["steps"].is_null().all()


def test_diverged_after_reaching_still_counts() -> None:
    hits = steps_to_target(_steps({"a": [2.0, 0.5, float("inf")]}), 1.0)
    a = _one(hits, "a")
    assert a["reached"] and a["diverged"] and a["steps"] == pytest.approx(1 + 1.0 / 1.5)


def test_single_step_runs_are_censored_not_crossings() -> None:
    hits = steps_to_target(_steps({"a": [0.5], "b": [2.0]}), 1.0)
    assert _one(hits, "a")["censored"] and not _one(hits, "a")["reached"]
    assert not _one(hits, "b")["reached"] and not _one(hits, "b")["censored"]
    best = best_per_batch(hits, pl.DataFrame({"run_id": ["a", "b"], "batch_size": [8, 16], "lr": [0.1, 0.1]}))
    assert best["censored"].to_list() == [True, False]
    fit = fit_tradeoff(best)
    assert fit.reason == "no batch size reached the target"
    assert fit.warnings == ("B = 8: already at or below the target at the first point, so steps to target are not "
                            "measured: left out of the fit",)


def test_eval_and_accuracy_metrics() -> None:
    ev = pl.DataFrame({"run_id": ["a"] * 6, "step": [10, 20, 30, 10, 20, 30],
                       "split": ["test"] * 3 + ["train"] * 3, "examples": [100, 200, 300] * 2,
                       "loss": [1.0, 0.6, 0.2, 0.9, 0.5, 0.1], "accuracy": [0.5, 0.7, 0.9, 0.6, 0.8, 0.95]})
    t = _one(steps_to_target(None, 0.4, metric="test_loss", evals=ev), "a")
    assert t["steps"] == pytest.approx(25.0) and t["examples"] == pytest.approx(250.0)
    acc = _one(steps_to_target(None, 0.8, metric="test_accuracy", evals=ev), "a")
    assert acc["reached"] and acc["steps"] == pytest.approx(25.0) and acc["best_value"] == 0.9
    assert not _one(steps_to_target(None, 0.99, metric="test_accuracy", evals=ev), "a")["reached"]
    with pytest.raises(ValueError, match="needs evals"):
        steps_to_target(None, 0.4, metric="test_loss")
    with pytest.raises(ValueError, match="metric"):
        steps_to_target(_steps({"a": [1.0]}), 0.4, metric="bogus")


def test_missing_columns_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lacks column"):
        steps_to_target(pl.DataFrame({"run_id": ["a"], "step": [1]}), 1.0)
    with pytest.raises(ValueError, match="target"):
        steps_to_target(_steps({"a": [1.0]}), float("nan"))


# --- best LR per batch size --------------------------------------------------------------------------

def _hits(rows: list[tuple[str, int, float, float | None]]) -> pl.DataFrame:
    """(run_id, batch_size, lr, steps or None when not reached)."""
    return pl.DataFrame({
        "run_id": [r[0] for r in rows], "batch_size": [r[1] for r in rows], "lr": [r[2] for r in rows],
        "steps": [r[3] for r in rows], "examples": [None if r[3] is None else r[3] * r[1] for r in rows],
        "reached": [r[3] is not None for r in rows],
    }, schema_overrides={"steps": pl.Float64, "examples": pl.Float64})


def test_best_lr_takes_fewest_steps_and_reports_the_lr_range() -> None:
    h = _hits([("a", 8, 0.1, 300.0), ("b", 8, 0.2, 200.0), ("c", 8, 0.4, 250.0), ("d", 8, 0.8, None),
               ("e", 16, 0.1, None), ("f", 16, 0.2, None)])
    best = best_per_batch(h)
    b8 = best.filter(pl.col("batch_size") == 8).row(0, named=True)
    assert b8["lr"] == 0.2 and b8["steps"] == 200.0 and b8["run_id"] == "b" and not b8["lr_at_edge"]
    assert (b8["lr_min_reached"], b8["lr_max_reached"], b8["lr_min"], b8["lr_max"]) == (0.1, 0.4, 0.1, 0.8)
    assert (b8["n_runs"], b8["n_reached"], b8["n_lrs"]) == (4, 3, 4)
    b16 = best.filter(pl.col("batch_size") == 16).row(0, named=True)
    assert not b16["reached"] and b16["lr"] is None


def test_seeds_combine_by_median_with_misses_as_infinite() -> None:
    h = _hits([("a1", 8, 0.1, 100.0), ("a2", 8, 0.1, None),  # half the seeds missed: cell not reached
               ("b1", 8, 0.2, 150.0), ("b2", 8, 0.2, 170.0), ("b3", 8, 0.2, None)])  # median 170
    b = best_per_batch(h).row(0, named=True)
    assert b["lr"] == 0.2 and b["steps"] == 170.0 and b["run_id"] == "b1"


def test_ties_pick_the_middle_lr() -> None:
    h = _hits([("a", 8, 0.1, 100.0), ("b", 8, 0.2, 100.0), ("c", 8, 0.4, 100.0), ("d", 8, 0.8, 101.0)])
    assert best_per_batch(h)["lr"][0] == 0.2
    assert best_per_batch(h, rtol=0.02)["lr"][0] == 0.2  # 4 tied: lower of the two middles
    h2 = _hits([("a", 8, 0.1, 100.0), ("b", 8, 0.2, 101.0), ("c", 8, 0.4, 102.0)])
    assert best_per_batch(h2)["lr"][0] == 0.1 and best_per_batch(h2)["lr_at_edge"][0]
    assert best_per_batch(h2, rtol=0.05)["lr"][0] == 0.2


def test_include_diverged_false_skips_runs_that_blew_up() -> None:
    h = _hits([("a", 8, 0.1, 300.0), ("b", 8, 0.8, 100.0)]).with_columns(diverged=pl.Series([False, True]))
    assert best_per_batch(h)["lr"][0] == 0.8
    assert best_per_batch(h, include_diverged=False)["lr"][0] == 0.1


# --- whole pipeline on a synthetic sweep, and the degenerate sweeps ----------------------------------

def test_pipeline_recovers_b_crit_from_loss_curves() -> None:
    runs, steps, _ = sweep(b_crit=128.0, s_min=200.0, noise=0.03, seeds=2, seed=7)
    hits = steps_to_target(steps, [0.5, 0.3], smoothing_examples=1024, runs=runs)
    assert hits.height == 2 * runs.height
    fit = fit_tradeoff(best_per_batch(hits.filter(pl.col("target") == 0.3)))
    assert fit.ok and fit.b_crit == pytest.approx(128.0, rel=0.10)
    assert fit.b_crit_ci[0] < 128.0 < fit.b_crit_ci[1]
    vs = tradeoff_vs_target(hits, n_boot=100)
    assert vs["target"].to_list() == [0.5, 0.3]
    assert vs["b_crit"].to_numpy() == pytest.approx([128.0, 128.0], rel=0.10)
    assert vs["reason"].is_null().all()


def test_all_diverged_sweep_never_draws_a_line() -> None:
    # 3,000 steps per run (unbounded, the 8x-LR runs were 1.4 M steps each, 3.4 M rows in all): still under
    # 3x every run's own steps to target, so each diverges at <= 0.9x of them, before it could reach.
    runs, steps, evals = sweep(lr_mults=(4.0, 8.0), diverge_above=0.0, seed=1, max_steps=3000)
    assert (runs["status"] == "diverged").all()
    hits = steps_to_target(steps, 0.3, runs=runs)
    assert not hits["reached"].any() and hits["diverged"].all()
    best = best_per_batch(hits)
    assert not best["reached"].any()
    assert fit_tradeoff(best).reason == "no batch size reached the target"
    assert not lr_scaling(best).ok
    grid = stability_map(hits, metric="final_value")
    assert set(grid.cells["state"]) == {"diverged"} and grid.by_batch["best_lr"].is_null().all()
    assert generalization(evals, runs).reason is not None
    vs = tradeoff_vs_target(hits)
    assert vs["b_crit"].is_nan().all() and vs["reason"][0] == "no batch size reached the target"


def test_unreachable_target_and_one_batch_size() -> None:
    runs, steps, _ = sweep(batch_sizes=(64,), seed=2)
    hits = steps_to_target(steps, [0.3, 0.001], runs=runs)
    vs = tradeoff_vs_target(hits)
    assert vs.filter(pl.col("target") == 0.3)["reason"][0].startswith("only 1 batch size")
    assert vs.filter(pl.col("target") == 0.001)["reason"][0] == "no batch size reached the target"


def test_empty_inputs() -> None:
    empty = pl.DataFrame(schema={"run_id": pl.String, "step": pl.Int64, "examples": pl.Int64, "loss": pl.Float64})
    hits = steps_to_target(empty, 0.5)
    assert hits.height == 0
    assert best_per_batch(hits, pl.DataFrame({"run_id": [], "batch_size": [], "lr": []},
                                             schema={"run_id": pl.String, "batch_size": pl.Int64,
                                                     "lr": pl.Float64})).height == 0
    assert not fit_tradeoff(pl.DataFrame({"batch_size": [], "steps": []})).ok
    assert not stability_map(pl.DataFrame({"run_id": [], "batch_size": [], "lr": [], "final_loss": []})).ok


def test_nan_rows_in_run_metadata_are_skipped() -> None:
    h = _hits([("a", 8, 0.1, 100.0), ("b", 16, 0.1, 60.0), ("c", 32, 0.1, 40.0)])
    h = pl.concat([h, pl.DataFrame({"run_id": ["x"], "batch_size": [None], "lr": [float("nan")], "steps": [1.0],
                                    "examples": [1.0], "reached": [True]}, schema=h.schema)])
    best = best_per_batch(h)
    assert best.height == 3 and np.isfinite(best["steps"].to_numpy()).all()
