"""The SQL macros of schema/sql/20_analysis.sql on a real DuckDB store give what the Python API gives on
frames (the same definitions, run in memory by schema.frames), and the Python fit's reasons and
warnings (censored crossings, batch schedules, extrapolated B_crit) come out of SQL word for word."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from collector.store import read_connection
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
    with read_connection(db) as con:
        return con.sql(query).pl()


def _same(a: pl.DataFrame, b: pl.DataFrame, keys: list[str], cols: list[str], rtol: float = 1e-9) -> None:
    assert a.height == b.height
    j = a.join(b, on=keys, suffix="_sql", how="full", coalesce=True)
    assert j.height == a.height
    for c in cols:
        x = j[c].cast(pl.Float64).to_numpy()
        y = j[f"{c}_sql"].cast(pl.Float64).to_numpy()
        assert np.array_equal(np.isnan(x), np.isnan(y)), c
        assert np.allclose(x, y, rtol=rtol, atol=1e-12, equal_nan=True), c


def test_smoothed_loss_matches(store) -> None:
    db, _, steps, _ = store
    for width in (0, 7 * 1024):
        py = smooth_steps(steps, width)
        sq = _sql(db, f"SELECT * FROM smoothed_loss({width})")
        _same(py, sq, ["run_id", "bucket"], ["step", "examples", "value", "n"])


@pytest.mark.parametrize("width", [0, 7 * 1024])
def test_crossings_on_the_store_match_the_frames(store, width: int) -> None:
    db, runs, steps, _ = store
    py = steps_to_target(steps, TARGETS, smoothing_examples=width, runs=runs)
    sq = _sql(db, f"SELECT * FROM crossings({TARGETS}, width_examples := {width})")
    assert sq.height == len(TARGETS) * runs.height
    _same(py, sq, ["run_id", "target"], ["steps", "examples", "hit_value", "best_value", "final_value", "last_step",
                                         "b_simple", "g2", "trace_sigma", "n_noise"])
    j = py.join(sq, on=["run_id", "target"], suffix="_sql")
    for c in ("reached", "censored", "diverged", "stalled", "outcome", "reason"):
        assert (j[c].cast(pl.String).fill_null("-") == j[f"{c}_sql"].cast(pl.String).fill_null("-")).all(), c
    assert py["reached"].any() and not py["reached"].all()


def test_core_steps_to_target_is_a_view_of_crossings(store) -> None:
    db, runs, steps, _ = store
    py = steps_to_target(steps, 0.3, runs=runs)
    sq = _sql(db, "SELECT * FROM steps_to_target(0.3)")
    _same(py.select("run_id", "steps", "examples"), sq.select("run_id", "steps", "examples"), ["run_id"],
          ["steps", "examples"])


@pytest.mark.parametrize("rtol", [0.0, 0.05])
def test_best_lr_per_batch_matches(store, rtol: float) -> None:
    db, runs, steps, _ = store
    py = best_per_batch(steps_to_target(steps, TARGETS, smoothing_examples=7 * 1024, runs=runs), rtol=rtol)
    sq = _sql(db, f"SELECT * FROM best_lr_per_batch({TARGETS}, width_examples := 7 * 1024, rtol := {rtol})")
    _same(py, sq, ["target", "batch_size"], ["lr", "steps", "examples", "n_runs", "n_reached", "n_diverged", "n_lrs",
                                             "lr_min", "lr_max", "lr_min_reached", "lr_max_reached", "b_simple",
                                             "effective_batch"])
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
    best = best_per_batch(steps_to_target(steps, TARGETS, smoothing_examples=7 * 1024, runs=runs))
    sq = _sql(db, f"SELECT * FROM critical_batch({TARGETS}, width_examples := 7 * 1024)")
    assert sq["target"].to_list() == TARGETS
    for t in (0.5, 0.3):
        fit = fit_tradeoff(best.filter(pl.col("target") == t), n_boot=0)
        row = sq.filter(pl.col("target") == t).row(0, named=True)
        assert fit.ok and row["reason"] is None
        assert row["b_crit"] == pytest.approx(fit.b_crit, rel=1e-4)
        assert row["s_min"] == pytest.approx(fit.s_min, rel=1e-4)
        assert row["e_min"] == pytest.approx(fit.e_min, rel=1e-4)
        assert row["r2"] == pytest.approx(fit.r2, abs=1e-6)
        assert tuple(row["warnings"]) == fit.warnings
        assert row["b_crit"] == pytest.approx(128.0, rel=0.10)
    assert sq.filter(pl.col("target") == 0.01)["reason"][0] == "no batch size reached the target"


def _store_of(path: Path, runs: pl.DataFrame, steps: pl.DataFrame) -> Path:
    con = duckdb.connect(str(path))
    try:
        ensure_schema(con)
        for name, frame in (("runs", runs), ("steps", steps)):
            con.register("_f", frame.to_arrow())
            con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _f")
            con.unregister("_f")
    finally:
        con.close()
    return path


def _both(db: Path, runs: pl.DataFrame, steps: pl.DataFrame, target: float, **kw):
    """(SQL critical_batch row, Python TradeoffFit) for one target on the same runs."""
    row = _sql(db, f"SELECT * FROM critical_batch([{target}])").row(0, named=True)
    fit = fit_tradeoff(best_per_batch(steps_to_target(steps, target, runs=runs)), **kw)
    return row, fit


def _runs_reaching(pts: dict[int, float], sweep_name: str = "s", schedule: int | None = None):
    """Runs of one LR whose loss falls linearly from 2 to 0, crossing 1.0 exactly at step S = pts[B].
    schedule=k: the batch size doubles after step k (examples follow it)."""
    runs, steps = [], []
    for b, s in pts.items():
        rid = f"{sweep_name}{b:05d}"
        runs.append({"run_id": rid, "name": rid, "sweep": sweep_name, "status": "finished", "batch_size": b,
                     "lr": 0.1})
        n = int(np.ceil(2 * s))
        t = np.arange(1, n + 1)
        bs = np.where(t <= (schedule or n), b, 2 * b)
        steps.append(pl.DataFrame({"run_id": rid, "step": t, "examples": np.cumsum(bs), "batch_size": bs,
                                   "loss": 2.0 - t / s}))
    return pl.DataFrame(runs), pl.concat(steps)


def test_critical_batch_reasons_match_python(tmp_path: Path) -> None:
    """Flat steps, perfect 1/B scaling and two batch sizes: SQL says why, word for word like fit_tradeoff."""
    cases = {"flat": {8: 100, 16: 100, 32: 100}, "perfect": {8: 400, 16: 200, 32: 100}, "two": {8: 100, 16: 60}}
    for name, pts in cases.items():
        runs, steps = _runs_reaching(pts, name)
        db = _store_of(tmp_path / f"{name}.duckdb", runs, steps)
        row, fit = _both(db, runs, steps, 1.0)
        assert row["b_crit"] is None and row["reason"] == fit.reason, name
        assert {"flat": "do not fall", "perfect": "perfect scaling", "two": "only 2"}[name] in fit.reason


def test_extrapolated_b_crit_is_flagged_in_python_and_sql(tmp_path: Path) -> None:
    """Truth B_crit = 50,000 far beyond the batches measured (8..1024): both say extrapolated, and the page's
    'for your next run' sentence recommends no batch size."""
    from dashboard.pages.tradeoff import next_run_sentence

    # S_min = 10 steps (fits are scale-free in steps: 100 gave the same B_crit to 1e-12, with 1.7 M rows, not 0.17 M)
    pts = {b: 10.0 * (1 + 50_000 / b) for b in (8, 32, 128, 512, 1024)}
    runs, steps = _runs_reaching(pts, "x")
    db = _store_of(tmp_path / "x.duckdb", runs, steps)
    row, fit = _both(db, runs, steps, 1.0, n_boot=200)
    assert fit.ok and row["b_crit"] == pytest.approx(fit.b_crit, rel=1e-3)
    assert any("extrapolated" in w for w in fit.warnings)
    assert list(row["warnings"]) == list(fit.warnings)
    sentence = next_run_sentence(fit, 1.0, "train loss")
    assert "extrapolated" in sentence and "for the next run" not in sentence


def test_censored_crossings_give_a_reason_in_python_and_sql(tmp_path: Path) -> None:
    """A batch size below the target at its first point is left out of the fit, with the same warning."""
    pts = {8: 1300.0, 16: 700.0, 32: 400.0, 64: 250.0, 128: 0.9}  # B = 128 is below 1.0 at step 1
    runs, steps = _runs_reaching(pts, "c")
    db = _store_of(tmp_path / "c.duckdb", runs, steps)
    hits = _sql(db, "SELECT * FROM crossings([1.0])")
    cens = hits.filter(pl.col("batch_size") == 128).row(0, named=True)
    assert cens["censored"] and not cens["reached"] and "not measured" in cens["reason"]
    row, fit = _both(db, runs, steps, 1.0, n_boot=0)
    assert fit.n_points == 4 and row["n_batches"] == 4
    assert any(w.startswith("B = 128: already at or below the target") for w in fit.warnings)
    assert list(row["warnings"]) == list(fit.warnings)


def test_scheduled_runs_are_fitted_at_the_effective_batch(tmp_path: Path) -> None:
    """Batch size doubling after step 10: the truth B_crit = 200 holds at the effective batch E/S; fitting at
    the initial batch size would give about 100. Python and SQL both fit E/S and say so."""
    s_min, c, k = 100.0, 200.0, 10
    pts = {}
    for b in (8, 16, 32, 64, 128, 256, 512, 1024):
        s = s_min * (1 + c / b)
        for _ in range(100):  # S = S_min (1 + c / B_eff(S)), B_eff = E(S)/S = 2B - kB/S
            s = s_min * (1 + c / (2 * b - k * b / s))
        pts[b] = s
    runs, steps = _runs_reaching(pts, "sch", schedule=k)
    db = _store_of(tmp_path / "sch.duckdb", runs, steps)
    row, fit = _both(db, runs, steps, 1.0, n_boot=0)
    assert fit.b_crit == pytest.approx(200.0, rel=0.01) and row["b_crit"] == pytest.approx(200.0, rel=0.01)
    assert any("effective batch" in w for w in fit.warnings)
    assert list(row["warnings"]) == list(fit.warnings)


def test_noise_scale_on_the_store_matches_the_frames(store) -> None:
    db, _, steps, _ = store
    py = noise_scale(steps, noise_window=0.3)
    sq = _sql(db, "SELECT * FROM noise_scale(noise_window := 0.3)")
    _same(py.select("run_id", "step", "g2", "trace_sigma", "b_simple", "n_noise"),
          sq.select("run_id", "step", "g2", "trace_sigma", "b_simple", "n_noise"), ["run_id", "step"],
          ["g2", "trace_sigma", "b_simple", "n_noise"], rtol=1e-7)


def test_lr_batch_grid_matches_stability_map(store) -> None:
    db, *_ = store
    summary = _sql(db, "SELECT s.*, o.outcome FROM run_summary s JOIN run_outcomes() o USING (run_id)")
    grid = stability_map(summary, metric="final_loss")
    sq = _sql(db, "SELECT * FROM lr_batch_grid")
    py = grid.cells.with_columns(pl.col("batch_size").cast(pl.Float64))
    sq = sq.with_columns(pl.col("batch_size").cast(pl.Float64)).rename({"final_loss": "value"})
    _same(py, sq, ["batch_size", "lr"], ["base_lr", "n_runs", "n_ok", "n_stalled", "n_diverged", "n_unfinished",
                                         "n_failed", "value"])
    j = py.join(sq, on=["batch_size", "lr"], suffix="_sql")
    assert (j["state"] == j["state_sql"]).all()
    assert {"ok", "diverged"} <= set(j["state"].to_list())
    assert j["n_unfinished"].sum() == 1 and j["n_failed"].sum() == 1


def test_stalled_runs_are_failed_cells_not_stable(tmp_path: Path) -> None:
    """A run whose loss never leaves ln 10 is 'stalled' in SQL and on the map, and not in the stable range."""
    runs = pl.DataFrame({"run_id": ["ok1", "ok2", "stuck"], "name": ["a", "b", "c"], "status": "finished",
                         "batch_size": 8, "lr": [0.1, 0.3, 0.001], "sweep": "s"})
    t = np.arange(1, 201)
    steps = pl.concat([
        pl.DataFrame({"run_id": "ok1", "step": t, "examples": 8 * t, "loss": 2.3 * np.exp(-t / 50)}),
        pl.DataFrame({"run_id": "ok2", "step": t, "examples": 8 * t, "loss": 2.3 * np.exp(-t / 30)}),
        pl.DataFrame({"run_id": "stuck", "step": t, "examples": 8 * t, "loss": np.log(10) - 1e-4 * t}),
    ])
    db = _store_of(tmp_path / "st.duckdb", runs, steps)
    out = _sql(db, "SELECT run_id, outcome FROM run_outcomes() ORDER BY run_id")
    assert dict(out.iter_rows()) == {"ok1": "trained", "ok2": "trained", "stuck": "stalled"}
    summary = _sql(db, "SELECT s.*, o.outcome FROM run_summary s JOIN run_outcomes() o USING (run_id)")
    smap = stability_map(summary)
    by = smap.by_batch.row(0, named=True)
    assert (by["lr_stable_min"], by["lr_stable_max"]) == (0.1, 0.3)
    cells = dict(smap.cells.select("lr", "state").iter_rows())
    assert cells[0.001] == "stalled"
    grid = _sql(db, "SELECT lr, state FROM lr_batch_grid ORDER BY lr")
    assert dict(grid.iter_rows()) == cells


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
    py = noise_at(steps, pl.DataFrame({"run_id": ids, "steps": at}), noise_window=0.5)
    _same(py, sq, ["run_id", "steps"], ["b_simple", "g2", "trace_sigma", "n_noise"])
    assert sq.filter(pl.col("run_id") == "nosteps0000")["n_noise"][0] == 0


def test_crossings_can_skip_the_noise(store) -> None:
    db, *_ = store
    sq = _sql(db, "SELECT * FROM crossings([0.3], width_examples := 7 * 1024, noise_window := NULL)")
    assert sq["reached"].any() and sq["b_simple"].is_null().all() and (sq["n_noise"] == 0).all()
