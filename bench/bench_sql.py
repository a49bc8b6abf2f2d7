"""What the bounded SQL engine costs: a console query through a warm worker process vs the same query
in-process (the baseline, measured in the same run), and `collector sql` end to end.

    python bench/bench_sql.py                 # synthetic store, 20 repeats
    python bench/bench_sql.py --runs 100 --steps 20000 --repeats 30
    python bench/bench_sql.py --hostile       # the real dashboard over HTTP: its RSS under hostile SQL

Prints one line per query: median and p95 in ms for in-process and worker, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector.sql_engine import CONSOLE_LIMITS, duckdb_config, execute  # noqa: E402
from collector.sql_worker import WorkerPool  # noqa: E402
from collector.store import read_connection  # noqa: E402
from dashboard.synthetic import make_store  # noqa: E402

QUERIES = {
    "one row": "SELECT 42 AS x",
    "run_summary": "SELECT name, batch_size, lr, best_loss FROM run_summary ORDER BY best_loss",
    "5,000 step rows": "SELECT * FROM steps LIMIT 5000",
    "aggregate over steps": "SELECT run_id, avg(loss), max(step) FROM steps GROUP BY run_id",
}


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        out.append((time.perf_counter() - t0) * 1000)
        assert res.ok, res.message
    return out


def hostile(db: Path, tmp: Path) -> None:
    """tests/test_sql_engine.py's hostile queries through a real dashboard; its RSS every 10 ms."""
    import threading

    from tests.dashboard_server import start_server
    from tests.test_sql_engine import HOSTILE

    srv = start_server(db, tmp, "--sql-timeout", "3")
    try:
        srv.callback("sql-grid.rowData", {"sql-run.n_clicks": 1}, {"sql-text.value": "SELECT 1"})
        base, samples, done = srv.rss_kb(), [], threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(srv.rss_kb())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        for sql, _rule in HOSTILE:
            t0 = time.perf_counter()
            r = srv.callback("sql-grid.rowData", {"sql-run.n_clicks": 2}, {"sql-text.value": sql})
            msg = r.json()["response"]["sql-message"]["children"].splitlines()[0][:80]
            print(f"{time.perf_counter() - t0:6.2f} s {len(r.body) / 1e6:7.2f} MB  {sql[:50]:50s} {msg}")
        done.set()
        sampler.join()
        print(f"server RSS: {base / 1024:.0f} MB before, peak {max(samples) / 1024:.0f} MB ({len(samples)} samples)")
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--hostile", action="store_true", help="measure the dashboard's RSS under hostile SQL instead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "runs.duckdb"
        make_store(db, n_runs=args.runs, steps=args.steps, seeds=1)
        if args.hostile:
            hostile(db, Path(tmp))
            return
        pool = WorkerPool(size=1)
        print(f"store: {args.runs} runs x {args.steps} steps; {args.repeats} repeats; ms (median / p95)")
        for name, sql in QUERIES.items():
            def inproc(sql=sql):
                with read_connection(db, config=duckdb_config(CONSOLE_LIMITS)) as con:
                    return execute(con, sql, CONSOLE_LIMITS)

            base = _time(inproc, args.repeats)
            work = _time(lambda sql=sql: pool.run(db, sql, CONSOLE_LIMITS), args.repeats)
            print(f"{name:22s} in-process {statistics.median(base):7.1f} / {_p(base, .95):7.1f}   "
                  f"worker {statistics.median(work):7.1f} / {_p(work, .95):7.1f}   "
                  f"ratio {statistics.median(work) / statistics.median(base):5.2f}x")
        pool.close()
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "collector", "sql", "--db", str(db), "SELECT 42"], cwd=ROOT,
                           check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import collector.cli"], cwd=ROOT, check=True)
        imports = time.perf_counter() - t0
        print(f"collector sql 'SELECT 42' end to end: median {statistics.median(walls):.2f} s "
              f"(python + import collector.cli alone: {imports:.2f} s)")


if __name__ == "__main__":
    main()
