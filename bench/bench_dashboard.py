"""Latency of each dashboard page's main callback over large synthetic stores (no browser).

    python bench/bench_dashboard.py                       # 1,000 runs x 10,000 steps (10 sweeps of 100 runs)
    python bench/bench_dashboard.py --runs 100 --steps 100000 --sweeps 1
    python bench/bench_dashboard.py --quick               # 200 x 2,000, for a smoke test

Each page's callback is a thin wrapper around one function of the store path (runs_rows, curves_figure,
noise_view, tradeoff_view, generalization_view, lr_batch_view, console_view, live_token); this drives
those functions, plus the JSON encoding Dash does on their output, in three situations:

- interact: the store is unchanged and the user moves a control (slider, axis, metric): the cache of
  query results is warm, each call gets new arguments;
- after-write: a writer just committed (the store version changed), so every cached query result is
  stale and re-read; rows of finished runs in the run summary are kept (that is how the app behaves);
- cold: nothing cached at all (the first visit after the server starts).

A page looks at one sweep (its default scope); the tradeoff page is also timed over all runs.
Stores are generated once into bench/out/ (git-ignored) by dashboard.synthetic.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import plotly.utils  # noqa: E402
import polars as pl  # noqa: E402

from dashboard import console, queries  # noqa: E402
from dashboard.synthetic import make_store  # noqa: E402


def build(db: Path, runs: int, steps: int, sweeps: int) -> None:
    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per = runs // sweeps
    for i in range(sweeps):
        make_store(db, n_runs=per, steps=steps, seeds=3, sweep=f"sweep-{i:02d}", seed=i, eval_every=max(1, steps // 40))
    print(f"built {db} ({runs} runs x {steps} steps) in {time.perf_counter() - t0:.0f} s", flush=True)


def encode(value) -> int:
    return len(json.dumps(value, cls=plotly.utils.PlotlyJSONEncoder))


def p(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--sweeps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=20, help="calls per callback and situation")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--db", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.runs, a.steps, a.sweeps, a.repeat = 200, 2000, 2, 5
    db = a.db or ROOT / "bench" / "out" / f"bench_{a.runs}x{a.steps}_{a.sweeps}sw.duckdb"
    build(db, a.runs, a.steps, a.sweeps)
    db = queries.configure(db)

    from dashboard.app import live_token
    from dashboard.pages import curves, generalization, lr_batch, noise, runs, sql, tradeoff
    from dashboard.sweeps import target_range

    table = queries.run_table(db)
    sweep = sorted(table["sweep"].drop_nulls().unique().to_list())[0]
    sweep_ids = table.filter(pl.col("sweep") == sweep)["run_id"].to_list()
    all_ids = table["run_id"].to_list()
    sel = table.filter(pl.col("sweep") == sweep).sort("batch_size", "lr")["run_id"].to_list()[::5][:20]
    tr = target_range(db, sweep_ids)
    tr_all = target_range(db, all_ids)
    targets = [tr.default * f for f in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)]
    targets_all = [tr_all.default * f for f in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)]
    xs = ["step", "examples", "wall_time"]
    metrics = list(lr_batch.METRICS)
    examples = list(console.EXAMPLE_QUERIES.items())
    light = [q for n, q in examples if "steps_to_target" not in q and "noise_scale" not in q]
    heavy = [q for n, q in examples if q not in light]

    cases = {
        "runs: runs_rows + sweep_summary": lambda i: (runs.runs_rows(db), runs.sweep_summary(db)),
        f"curves: curves_figure ({len(sel)} runs)": lambda i: curves.curves_figure(
            db, sel, ["loss", "loss", "test_loss", "lr"][i % 4], xs[i % 3], [0.6, 0.8, 0.0, 0.95][i % 4], log_y=True),
        "noise: noise_view (sweep)": lambda i: noise.noise_view(db, sweep_ids, ["examples", "step"][i % 2]),
        "tradeoff: tradeoff_view (sweep)": lambda i: tradeoff.render(
            tradeoff.tradeoff_view(db, sweep_ids, targets[i % len(targets)]), sweep, "train_loss"),
        f"tradeoff: tradeoff_view (all {len(all_ids)} runs)": lambda i: tradeoff.render(
            tradeoff.tradeoff_view(db, all_ids, targets_all[i % len(targets_all)]), "all runs", "train_loss"),
        "generalization: generalization_view (sweep)": lambda i: generalization.generalization_view(
            db, sweep_ids, ["train_loss", "matched", "end"][i % 3], ["gap_loss", "gap_accuracy"][(i // 3) % 2]),
        "lr × batch: lr_batch_view (sweep)": lambda i: lr_batch.lr_batch_view(
            db, sweep_ids, metrics[i % len(metrics)], ["lr", "base_lr"][i % 2]),
        "sql: console_view (run_summary, catalog examples)": lambda i: sql.console_view(db, light[i % len(light)]),
        "live: live_token (every 2 s)": lambda i: live_token(db)[0],
    }

    def after_write() -> None:
        queries.CACHE.clear()  # a new store version misses every cached result ...

    def cold() -> None:
        queries.clear_cache()  # ... and at first start there is nothing at all

    print(f"store {db.name}: {len(all_ids)} runs, {int(table['steps'].sum()):,} steps; sweep {sweep}: "
          f"{len(sweep_ids)} runs; {platform.processor() or platform.machine()}, {platform.python_version()}",
          flush=True)
    results = []
    for name, fn in cases.items():
        row = {"callback": name}
        for situation, reset in (("interact", None), ("after-write", after_write), ("cold", cold)):
            n = a.repeat if situation == "interact" else max(3, a.repeat // 2)
            fn(0)  # warm the process (imports, first connection)
            times = []
            for i in range(n):
                if reset:
                    reset()
                t0 = time.perf_counter()
                encode(fn(i + 1))
                times.append((time.perf_counter() - t0) * 1000)
            row[situation] = (p(times, 50), p(times, 95))
        results.append(row)
        print(f"{name:50s} " + "  ".join(f"{k} p50 {row[k][0]:6.0f} p95 {row[k][1]:6.0f} ms"
                                          for k in ("interact", "after-write", "cold")), flush=True)

    for q in heavy:  # SQL macros over every step of the store: timed once each (they are bounded by the 10 s limit)
        t0 = time.perf_counter()
        view = sql.console_view(db, q)
        print(f"console example over all steps: {(time.perf_counter() - t0) * 1000:.0f} ms, ok={view['ok']}: "
              f"{q.splitlines()[0][:70]} / {view['message'][:60]}", flush=True)

    print("\n| callback | interact p50 / p95 | after a write p50 / p95 | cold p50 / p95 |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['callback']} | " + " | ".join(f"{r[k][0]:.0f} / {r[k][1]:.0f} ms"
                                                  for k in ("interact", "after-write", "cold")) + " |")


if __name__ == "__main__":
    main()
