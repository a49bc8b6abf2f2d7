"""The SQL macros of schema/sql/20_analysis.sql (and the core ones they mirror) agree with the Python fits,
on a real DuckDB file created by the schema's own migrations."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from dashboard.analysis import (
    best_per_batch,
    fit_tradeoff,
    generalization,
    noise_at,
    noise_scale,
    smooth_steps,
    stability_map,
    steps_to_target,
)
from dashboard.analysis.simulate import sweep
from schema import ensure_schema

TARGETS = [0.5, 0.3, 0.01]


def _with_noise(steps: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """Add gradient-noise ingredients on every third step (NULL elsewhere), with some negative |G|^2."""
    rng = np.random.default_rng(seed)
    n = steps.height
    measured = steps["step"].to_numpy() % 3 == 0
    small = np.where(measured, 1.0 + rng.random(n), np.nan)
    big = np.where(measured, 0.3 + 0.6 * rng.random(n), np.nan)
    return steps.with_columns(
        g_small_sq=pl.Series(small).fill_nan(None), b_small=pl.lit(4.0),
        g_big_sq=pl.Series(big).fill_nan(None), b_big=pl.lit(16.0),
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    runs, steps, evals = sweep(seeds=2, noise=0.03, seed=11)
    steps = _with_noise(steps)
    # a running run (half its steps), a failed run without steps, a run with a NaN in the middle
    live = runs.row(5, named=True)["run_id"]
    runs = runs.with_columns(status=pl.when(pl.col("run_id") == live).then(pl.lit("running"))
                             .otherwise(pl.col("status")))
    steps = steps.filter((pl.col("run_id") != live) | (pl.col("step") < 150))
    nan_run = runs.row(7, named=True)["run_id"]
    steps = steps.with_columns(loss=pl.when((pl.col("run_id") == nan_run) & (pl.col("step") == 40))
                               .then(float("nan")).otherwise(pl.col("loss")))
    extra = runs.head(1).with_columns(run_id=pl.lit("nosteps0000"), status=pl.lit("failed"))
    runs = pl.concat([runs, extra])
    db = tmp_path_factory.mktemp("sql") / "runs.duckdb"
    con = duckdb.connect(str(db))
    try:
        ensure_schema(con)
        for name, frame in (("runs", runs), ("steps", steps), ("evals", evals)):
            con.register("_f", frame.to_arrow())
            con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _f")
            con.unregister("_f")
    finally:
        con.close()
    return db, runs, steps, evals


def _sql(db: Path, query: str) -> pl.DataFrame:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.sql(query).pl()
    finally:
        con.close()


def _same(a: pl.DataFrame, b: pl.DataFrame, keys: list[str], cols: list[str], rtol: float = 1e-9) -> None:
    assert a.height == b.height
    j = a.join(b, on=keys, suffix="_sql", how="full", coalesce=True)
    assert j.height == a.height
    for c in cols:
        x = j[c].cast(pl.Float64).to_numpy()
        y = j[f"{c}_sql"].cast(pl.Float64).to_numpy()
        assert np.array_equal(np.isnan(x), np.isnan(y)), c
        assert np.allclose(x, y, rtol=rtol, atol=1e-12, equal_nan=True), c


def test_smoothed_steps_matches(store) -> None:
    db, _, steps, _ = store
    for width in (1, 7):
        py = smooth_steps(steps, width)
        sq = _sql(db, f"SELECT * FROM smoothed_steps({width})")
        _same(py, sq, ["run_id", "bucket"], ["step", "examples", "loss", "n"])


@pytest.mark.parametrize("width", [1, 7])
def test_crossings_matches_steps_to_target(store, width: int) -> None:
    db, runs, steps, _ = store
    py = steps_to_target(steps, TARGETS, smoothing=width, runs=runs)
    sq = _sql(db, f"SELECT * FROM crossings({TARGETS}, width := {width})")
    assert sq.height == len(TARGETS) * runs.height
    _same(py, sq, ["run_id", "target"], ["steps", "examples", "hit_value", "best_value", "final_value", "last_step",
                                         "b_simple", "g2", "trace_sigma", "n_noise"])
    j = py.join(sq, on=["run_id", "target"], suffix="_sql")
    assert (j["reached"] == j["reached_sql"]).all() and (j["diverged"] == j["diverged_sql"]).all()
    assert py["reached"].any() and not py["reached"].all()


def test_core_steps_to_target_agrees_without_smoothing(store) -> None:
    """10_core.sql's steps_to_target(target) and the Python function at smoothing=1 are the same definition."""
    db, runs, steps, _ = store
    py = steps_to_target(steps, 0.3, runs=runs)
    sq = _sql(db, "SELECT * FROM steps_to_target(0.3)")
    _same(py.select("run_id", "steps", "examples"), sq.select("run_id", "steps", "examples"), ["run_id"],
          ["steps", "examples"])


@pytest.mark.parametrize("rtol", [0.0, 0.05])
def test_best_lr_per_batch_matches(store, rtol: float) -> None:
    db, runs, steps, _ = store
    py = best_per_batch(steps_to_target(steps, TARGETS, smoothing=7, runs=runs), rtol=rtol)
    sq = _sql(db, f"SELECT * FROM best_lr_per_batch({TARGETS}, width := 7, rtol := {rtol})")
    _same(py, sq, ["target", "batch_size"], ["lr", "steps", "examples", "n_runs", "n_reached", "n_diverged", "n_lrs",
                                             "lr_min", "lr_max", "lr_min_reached", "lr_max_reached", "b_simple"])
    j = py.join(sq, on=["target", "batch_size"], suffix="_sql")
    assert (j["reached"] == j["reached_sql"]).all()
    assert (j["run_id"].fill_null("") == j["run_id_sql"].fill_null("")).all()
    assert (j["lr_at_edge"].fill_null(False) == j["lr_at_edge_sql"].fill_null(False)).all()


def test_best_lr_per_batch_filters_a_sweep(store) -> None:
    db, *_ = store
    assert _sql(db, "SELECT * FROM best_lr_per_batch([0.3], sweep_name := 'nope')").height == 0
    assert _sql(db, "SELECT * FROM best_lr_per_batch([0.3], sweep_name := 'sim')").height == 8


def test_critical_batch_matches_fit_tradeoff(store) -> None:
    db, runs, steps, _ = store
    best = best_per_batch(steps_to_target(steps, TARGETS, smoothing=7, runs=runs))
    sq = _sql(db, f"SELECT * FROM critical_batch({TARGETS}, width := 7)")
    assert sq["target"].to_list() == TARGETS
    for t in (0.5, 0.3):
        fit = fit_tradeoff(best.filter(pl.col("target") == t), n_boot=0)
        row = sq.filter(pl.col("target") == t).row(0, named=True)
        assert fit.ok and row["reason"] is None
        assert row["b_crit"] == pytest.approx(fit.b_crit, rel=1e-4)
        assert row["s_min"] == pytest.approx(fit.s_min, rel=1e-4)
        assert row["e_min"] == pytest.approx(fit.e_min, rel=1e-4)
        assert row["r2"] == pytest.approx(fit.r2, abs=1e-6)
        assert row["b_crit"] == pytest.approx(128.0, rel=0.10)
    assert sq.filter(pl.col("target") == 0.01)["reason"][0] == "no batch size reached the target"


def test_critical_batch_reasons_match_python(tmp_path: Path) -> None:
    """Flat steps, perfect 1/B scaling and two batch sizes: SQL says why, like fit_tradeoff."""
    db = tmp_path / "r.duckdb"
    con = duckdb.connect(str(db))
    ensure_schema(con)
    cases = {"flat": [(8, 100), (16, 100), (32, 100)], "perfect": [(8, 400), (16, 200), (32, 100)],
             "two": [(8, 100), (16, 60)]}
    rows, step_rows = [], []
    for sweep_name, pts in cases.items():
        for b, s in pts:
            rid = f"{sweep_name}{b:04d}"
            rows.append((rid, rid, sweep_name, "finished", b, 0.1))
            step_rows += [(rid, 1, b, 2.0), (rid, s, s * b, 0.5)]  # reaches 0.5 exactly at step s
    con.executemany("INSERT INTO runs (run_id, name, sweep, status, batch_size, lr) VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.executemany("INSERT INTO steps (run_id, step, examples, loss) VALUES (?, ?, ?, ?)", step_rows)
    con.close()
    for sweep_name, needle in (("flat", "do not fall"), ("perfect", "perfect scaling"), ("two", "only 2")):
        sq = _sql(db, f"SELECT * FROM critical_batch([0.5], sweep_name := '{sweep_name}')")
        assert needle in sq["reason"][0] and sq["b_crit"][0] is None
        steps = _sql(db, f"SELECT s.* FROM steps s JOIN runs USING (run_id) WHERE sweep = '{sweep_name}'")
        runs = _sql(db, f"SELECT * FROM runs WHERE sweep = '{sweep_name}'")
        assert needle in fit_tradeoff(best_per_batch(steps_to_target(steps, 0.5, runs=runs))).reason


def test_core_noise_scale_macro_matches_window_mode(store) -> None:
    db, _, steps, _ = store
    py = noise_scale(steps, window=20)
    sq = _sql(db, "SELECT * FROM noise_scale(20)")
    _same(py.select("run_id", "step", "g2", "trace_sigma", "b_simple"),
          sq.select("run_id", "step", "g2", "trace_sigma", "b_simple"), ["run_id", "step"],
          ["g2", "trace_sigma", "b_simple"], rtol=1e-7)


def test_lr_batch_grid_matches_stability_map(store) -> None:
    db, *_ = store
    summary = _sql(db, "SELECT * FROM run_summary")
    grid = stability_map(summary, metric="final_loss")
    sq = _sql(db, "SELECT * FROM lr_batch_grid")
    py = grid.cells.with_columns(pl.col("batch_size").cast(pl.Float64))
    sq = sq.with_columns(pl.col("batch_size").cast(pl.Float64)).rename({"final_loss": "value"})
    _same(py, sq, ["batch_size", "lr"], ["base_lr", "n_runs", "n_ok", "n_diverged", "n_unfinished", "n_failed",
                                         "value"])
    j = py.join(sq, on=["batch_size", "lr"], suffix="_sql")
    assert (j["state"] == j["state_sql"]).all()
    assert {"ok", "diverged"} <= set(j["state"].to_list())
    assert j["n_unfinished"].sum() == 1 and j["n_failed"].sum() == 1


def test_generalization_runs_view_matches(store) -> None:
    db, runs, _, evals = store
    gen = generalization(evals, runs, at="end")
    sq = _sql(db, "SELECT * FROM generalization_runs WHERE NOT diverged AND status = 'finished'")
    py = gen.per_run.filter(pl.col("status") == "finished")
    # run_summary also calls a run with a NaN training step diverged; compare the runs both keep
    py = py.filter(pl.col("run_id").is_in(sq["run_id"].implode()))
    assert py.height >= sq.height - 1
    sq = sq.filter(pl.col("run_id").is_in(py["run_id"].implode()))
    _same(py.select("run_id", "gap_loss", "gap_accuracy", "noise_g"),
          sq.select("run_id", "gap_loss", "gap_accuracy", "noise_g"), ["run_id"],
          ["gap_loss", "gap_accuracy", "noise_g"])


def test_noise_around_matches_noise_at(store) -> None:
    db, runs, steps, _ = store
    ids = runs["run_id"].to_list()[:6] + ["nosteps0000"]
    at = [30.0, 100.5, 250.0, 7.0, 1.0, 400.0, 50.0]
    sq = _sql(db, f"SELECT * FROM noise_around({ids}, {at}, noise_window := 0.5)")
    py = noise_at(steps, pl.DataFrame({"run_id": ids, "steps": at}), rel_window=0.5)
    _same(py, sq, ["run_id", "steps"], ["b_simple", "g2", "trace_sigma", "n_noise"])
    assert sq.filter(pl.col("run_id") == "nosteps0000")["n_noise"][0] == 0


def test_crossings_can_skip_the_noise(store) -> None:
    db, *_ = store
    sq = _sql(db, "SELECT * FROM crossings([0.3], width := 7, noise_window := NULL)")
    assert sq["reached"].any() and sq["b_simple"].is_null().all() and (sq["n_noise"] == 0).all()
