"""Benchmark: every fit of dashboard/analysis over a store of 1,000 runs x 10,000 steps.

    python bench/bench_analysis.py [--db PATH] [--runs 1000] [--steps 10000] [--repeat 5]
    python bench/bench_analysis.py --real runs.duckdb --sweep NAME     # the figures of a real sweep

Builds (once, then reuses) a synthetic store whose runs follow S(B) = S_min (1 + B_crit/B) with
B_crit = 128, then times the whole analysis the way the dashboard runs it: the per-step reductions
(loss smoothing over examples, first crossing of each target, B_simple around each crossing) in DuckDB through the
SQL macro `crossings` and B_simple around the best runs' crossings by `noise_around`
(schema/sql/20_analysis.sql), and in Python only per-run rows: best LR per batch,
the tradeoff fit with a 1,000-sample bootstrap, B_crit for 8 targets (200 samples each), the LR-scaling
fit, the generalization gap at matched examples (from `evals`) and the LR x batch map.
Results and the machine are recorded in bench/analysis.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboard.analysis import (  # noqa: E402
    best_per_batch,
    fit_tradeoff,
    generalization,
    lr_scaling,
    stability_map,
    tradeoff_vs_target,
)
from schema import ensure_schema, refresh_run_stats  # noqa: E402
from schema.frames import insert_rows  # noqa: E402

B_CRIT, S_MIN, EPS_MAX = 128.0, 500.0, 0.8
BATCHES = (8, 16, 32, 64, 128, 256, 512, 1024)
LR_MULTS = (0.25, 0.5, 1.0, 2.0, 4.0)
TARGETS = [0.8, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2]
MAIN_TARGET = 0.3
TASK = "bench-v2"  # bump when the generator changes, so an old store is rebuilt
WIDTH = 1024  # loss smoothing, examples per bucket: the largest batch size (the pages' default)


def build_store(db: Path, n_runs: int, n_steps: int, seed: int = 0) -> None:
    """Synthetic sweep: 8 batch sizes x 5 LRs x seeds; loss, noise ingredients every 10 steps, evals every 2.5 %."""
    rng = np.random.default_rng(seed)
    con = duckdb.connect(str(db))
    ensure_schema(con)
    t = np.arange(1, n_steps + 1, dtype=np.int64)
    measured = t % 10 == 0
    ev_steps = np.arange(n_steps // 40, n_steps + 1, n_steps // 40, dtype=np.int64)
    run_rows, parts, ev_parts = [], [], []
    l_inf, l0 = 0.05, 2.3

    def flush() -> None:
        if parts:
            insert_rows(con, "steps", pa.concat_tables(parts))
            insert_rows(con, "evals", pa.concat_tables(ev_parts))
        parts.clear()
        ev_parts.clear()

    for i in range(n_runs):
        b = BATCHES[i % len(BATCHES)]
        m = LR_MULTS[(i // len(BATCHES)) % len(LR_MULTS)]
        lr = EPS_MAX / (1 + B_CRIT / b) * m
        s_run = S_MIN * (1 + B_CRIT / b) * np.exp(0.03 * rng.standard_normal()) / (m * np.exp(1 - m))
        k = np.log((l0 - l_inf) / (MAIN_TARGET - l_inf)) / s_run
        clean = l_inf + (l0 - l_inf) * np.exp(-k * t)
        loss = clean * (1 + 0.2 / np.sqrt(b / 8) * rng.standard_normal(n_steps))
        status = "finished"
        if m > 3:
            cut = int(n_steps * rng.uniform(0.02, 0.2))
            loss[cut:] = np.nan
            loss[cut - 1] = np.inf
            status = "diverged"
        g2 = 0.02 * (clean - l_inf) + 1e-4
        tr = g2 * 64 * (1 + 0.3 / clean)  # B_simple = 128 at the main target, growing as the loss falls
        noise = lambda rel: 1 + rel * rng.standard_normal(n_steps)  # noqa: E731
        g_big = np.where(measured, (g2 + tr / b) * noise(0.05), np.nan)
        g_small = np.where(measured, (g2 + tr / (b / 2)) * noise(0.05), np.nan)
        run_id = f"{i:012x}"
        parts.append(pa.table({
            "run_id": pa.array(np.full(n_steps, run_id)), "step": t, "examples": t * b,
            "wall_time": t * (0.004 + b * 2e-5), "batch_size": np.full(n_steps, b, dtype=np.int32),
            "lr": np.full(n_steps, lr), "loss": loss,
            "g_small_sq": pa.array(g_small, from_pandas=True), "b_small": pa.array(np.where(measured, b / 2, np.nan),
                                                                                 from_pandas=True),
            "g_big_sq": pa.array(g_big, from_pandas=True), "b_big": pa.array(np.where(measured, float(b), np.nan),
                                                                             from_pandas=True),
        }))
        tr_loss = clean[ev_steps - 1]
        gap = 0.01 * (1 + np.log2(b)) * (1 - np.exp(-ev_steps * b / 20_000))
        ok = np.isfinite(loss[ev_steps - 1])
        n_ev = len(ev_steps)
        ev_parts.append(pa.table({
            "run_id": pa.array(np.full(2 * n_ev, run_id)), "step": np.r_[ev_steps, ev_steps],
            "split": np.r_[np.full(n_ev, "train"), np.full(n_ev, "test")], "examples": np.r_[ev_steps, ev_steps] * b,
            "loss": np.where(np.r_[ok, ok], np.r_[tr_loss, tr_loss + gap], np.nan),
            "accuracy": np.exp(-np.r_[tr_loss, tr_loss + gap]),
        }))
        run_rows.append({"run_id": run_id, "name": f"b{b}-lr{lr:.4g}-{i}", "sweep": "bench", "status": status,
                         "task": TASK, "optimizer": "sgd", "lr": lr, "momentum": 0.0, "weight_decay": 0.0,
                         "batch_size": b, "micro_batch_size": b // 2, "accum_steps": 2, "world_size": 1,
                         "train_size": 50_000, "seed": i // 40})
        if len(parts) >= 50:
            flush()
    flush()
    insert_rows(con, "runs", pa.Table.from_pylist(run_rows))
    refresh_run_stats(con)
    con.execute("CHECKPOINT")
    con.close()


def analyse(db: Path) -> dict[str, float]:
    """One full pass; returns the seconds spent in each part."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    con = duckdb.connect(str(db), read_only=True)
    try:
        # crossings without B_simple (noise_window := NULL), then B_simple only around the crossings of
        # the best-LR run of each (target, batch size): the runs the fits use, as the dashboard does
        hits = con.sql(f"SELECT * FROM crossings({TARGETS}, width_examples := {WIDTH}, noise_window := NULL)").pl()
        t1 = time.perf_counter()
        runs = con.sql("SELECT run_id, sweep, status, optimizer, lr, momentum, batch_size, train_size FROM runs").pl()
        evals = con.sql("SELECT run_id, step, split, examples, loss, accuracy FROM evals").pl()
        t2 = time.perf_counter()
        best = best_per_batch(hits, runs).filter(pl.col("reached"))
        # the best cell's fastest run, at its own crossing (a cell's steps are the median over seeds)
        pts = best.select("target", "run_id").join(hits.select("target", "run_id", "steps"), on=["target", "run_id"])
        noise = con.sql(f"SELECT * FROM noise_around({pts['run_id'].to_list()}, {pts['steps'].to_list()})").pl()
        t3 = time.perf_counter()
    finally:
        con.close()
    times["sql crossings (10M steps -> 8,000 rows)"] = t1 - t0
    times["read runs + evals (1k + 80k rows)"] = t2 - t1
    times["best LR per batch + sql noise_around (64 pts)"] = t3 - t2
    noise = pts.join(noise.unique(["run_id", "steps"]), on=["run_id", "steps"], how="left")
    hits = hits.drop("b_simple", "g2", "trace_sigma", "n_noise").join(
        noise.select("target", "run_id", "b_simple", "g2", "trace_sigma", "n_noise"), on=["target", "run_id"],
        how="left").with_columns(pl.col("n_noise").fill_null(0))
    t2 = time.perf_counter()
    best = best_per_batch(hits, runs)
    main = best.filter(pl.col("target") == MAIN_TARGET)
    fit = fit_tradeoff(main, n_boot=1000)
    t3 = time.perf_counter()
    times["best LR per batch + fit_tradeoff (1000 boot)"] = t3 - t2
    vs = tradeoff_vs_target(hits, runs, n_boot=200)
    t4 = time.perf_counter()
    times["tradeoff_vs_target (8 targets x 200 boot)"] = t4 - t3
    lr_fit = lr_scaling(main, n_boot=1000)
    gen = generalization(evals, runs)
    grid = stability_map(hits.filter(pl.col("target") == MAIN_TARGET), runs, metric="final_value")
    t5 = time.perf_counter()
    times["lr_scaling + generalization + stability_map"] = t5 - t4
    times["total"] = t5 - t0
    assert fit.ok and abs(fit.b_crit / B_CRIT - 1) < 0.2, (fit.b_crit, fit.reason)
    assert lr_fit.ok and gen.ok and grid.ok and vs.height == len(TARGETS)
    analyse.last = (fit, lr_fit, vs)  # type: ignore[attr-defined]
    return times


def real_sweep(db: Path, sweep: str | None, targets: list[float], width: float, noise_window: float) -> None:
    """The figures for a real sweep: steps to target per batch size, B_crit per target, B_simple there."""
    where = f"WHERE r.sweep = '{sweep}'" if sweep else ""
    with duckdb.connect(str(db), read_only=True) as con:
        n = con.execute("SELECT count(*) FROM duckdb_functions() WHERE function_name = 'crossings'").fetchall()[0][0]
        if not n:
            raise SystemExit(f"{db} has no analysis macros: open it once read-write (python -m collector ingest)")
        hits = con.sql(f"SELECT c.* FROM crossings({targets}, width_examples := {width}, noise_window := {noise_window}) c "
                       f"JOIN runs r USING (run_id) {where}").pl()
        runs = con.sql(f"SELECT * FROM runs r {where}").pl()
    best = best_per_batch(hits, runs)
    pl.Config.set_tbl_rows(100)
    pl.Config.set_tbl_cols(20)
    pl.Config.set_tbl_width_chars(200)
    print(f"{runs.height} runs, statuses {dict(runs['status'].value_counts().iter_rows())}")
    print(best.select("target", "batch_size", "lr", "steps", "examples", "n_reached", "n_runs", "lr_at_edge",
                      "b_simple").with_columns(pl.col("steps", "examples", "b_simple").round(1)))
    vs = tradeoff_vs_target(hits, runs, n_boot=1000)
    print(vs.select("target", "b_crit", "b_crit_lo", "b_crit_hi", "s_min", "e_min", "r2", "n_batches", "b_simple",
                    "b_simple_q25", "b_simple_q75", "reason").with_columns(pl.selectors.float().round(2)))
    for t in targets:
        sub = best.filter(pl.col("target") == t)
        fit, lr_fit = fit_tradeoff(sub), lr_scaling(sub)
        if fit.ok:
            print(f"target {t}: B_crit {fit.b_crit:.0f} [{fit.b_crit_ci[0]:.0f}, {fit.b_crit_ci[1]:.0f}], "
                  f"residuals (log) {np.round(fit.residuals, 3).tolist()}, warnings {list(fit.warnings)}")
        print(f"target {t}: LR scaling B_noise {lr_fit.b_noise:.0f} eps_max {lr_fit.eps_max:.3g} "
              f"({lr_fit.reason or 'ok'}; {'; '.join(lr_fit.warnings)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=os.environ.get("BENCH_DB", "/tmp/batchscope-bench-analysis.duckdb"))
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--real", metavar="DB", help="instead: report the figures of a real sweep in this store")
    p.add_argument("--sweep", help="with --real: the sweep name")
    p.add_argument("--targets", default="0.3,0.2,0.15,0.1,0.07,0.05", help="with --real: training-loss targets")
    p.add_argument("--width", type=float, default=1024, help="with --real: loss smoothing, examples per bucket")
    p.add_argument("--noise-window", type=float, default=1.0, help="with --real: B_simple over [S/(1+w), S(1+w)]")
    a = p.parse_args()
    slowest = S_MIN * (1 + B_CRIT / min(BATCHES))  # steps the smallest batch needs to reach MAIN_TARGET
    if not a.real and a.steps < 1.05 * slowest:
        p.error(f"--steps {a.steps}: the synthetic runs of batch {min(BATCHES)} need ~{slowest:,.0f} steps to reach "
                f"the target the B_crit check fits; use --steps {int(1.05 * slowest) + 1} or more")
    if a.real:
        real_sweep(Path(a.real), a.sweep, [float(x) for x in a.targets.split(",")], a.width, a.noise_window)
        return
    db = Path(a.db)
    expected = a.runs * a.steps
    have = 0
    if db.exists():
        with duckdb.connect(str(db), read_only=True) as con:
            have = con.execute("SELECT count(*) FROM steps").fetchone()[0]
            if con.execute("SELECT count(*) FROM runs WHERE task = ?", [TASK]).fetchone()[0] != a.runs:
                have = -1
    if have != expected:
        db.unlink(missing_ok=True)
        t = time.perf_counter()
        build_store(db, a.runs, a.steps)
        print(f"built {db} ({a.runs} runs x {a.steps} steps) in {time.perf_counter() - t:.1f} s")
    with duckdb.connect(str(db)) as con:  # bring the views/macros up to date once (not timed)
        ensure_schema(con)
    print(f"store: {db} ({db.stat().st_size / 1e6:.0f} MB, {expected:,} steps)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"duckdb {duckdb.__version__}, polars {pl.__version__}; load average {os.getloadavg()[0]:.2f}")
    runs = [analyse(db) for _ in range(a.repeat)]
    keys = list(runs[0])
    width = max(len(k) for k in keys)
    print(f"{'part':<{width}}  first    median   min   (seconds, {a.repeat} runs)")
    for k in keys:
        vals = [r[k] for r in runs]
        print(f"{k:<{width}}  {vals[0]:.3f}   {statistics.median(vals):.3f}   {min(vals):.3f}")
    fit, lr_fit, vs = analyse.last  # type: ignore[attr-defined]
    print(f"B_crit = {fit.b_crit:.1f} (90 % CI {fit.b_crit_ci[0]:.1f}..{fit.b_crit_ci[1]:.1f}), truth {B_CRIT:g}; "
          f"B_noise from best LR = {lr_fit.b_noise:.1f}")
    print(vs.select("target", "b_crit", "b_crit_lo", "b_crit_hi", "b_simple", "n_batches", "reason"))


if __name__ == "__main__":
    main()
