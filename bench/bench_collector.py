"""Collector benchmarks: ingest throughput vs DuckDB's own bulk Arrow insert, the cost of log_step, and
how often a plain DuckDB reader gets in while trainers write.

    python bench/bench_collector.py [--rows 1000000] [--calls 1000000]
    python bench/bench_collector.py --readers 8,16 [--seconds 30] [--code /path/to/other/checkout] [--dashboard]

Ratios are against baselines measured in the same process, so machine noise mostly cancels.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

import collector
from schema import ensure_schema

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "collector_workers.py"


def _steps_table(run_id: str, n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    step = np.arange(1, n + 1)
    return pa.table({
        "run_id": pa.array([run_id] * n), "step": step, "examples": step * 32, "wall_time": step * 0.01,
        "batch_size": pa.array(np.full(n, 32, dtype=np.int32)), "lr": np.full(n, 0.1), "loss": rng.random(n),
        "g_small_sq": rng.random(n), "b_small": np.full(n, 16.0), "g_big_sq": rng.random(n),
        "b_big": np.full(n, 32.0), "b_simple": rng.random(n),
    })


def _bulk_insert(data: pa.Table, db: Path) -> float:
    with duckdb.connect(str(db)) as con:
        ensure_schema(con)
        t = time.perf_counter()
        con.execute("INSERT INTO steps SELECT * FROM data")
        return time.perf_counter() - t


def bench_ingest(rows: int, folder: Path, repeats: int = 3) -> dict:
    """Rows logged with log_step -> spooled -> ingested, vs the same rows bulk-inserted from Arrow.

    Both sides run `repeats` times, interleaved, into fresh stores; the best time of each counts.
    """
    data = _steps_table("bulk00000000", rows)
    bulk, spooled, ingested, columnar, finished = [], [], [], [], []
    for i in range(repeats):
        bulk.append(_bulk_insert(data, folder / f"baseline{i}.duckdb"))
        s, g, f = _collector_ingest(data, folder / f"collector{i}.duckdb", log_step)
        spooled.append(s)
        ingested.append(g)
        finished.append(f)
        columnar.append(sum(_collector_ingest(data, folder / f"columnar{i}.duckdb", log_blocks)[:2]))
    bulk, spooled, ingested, columnar, finished = min(bulk), min(spooled), min(ingested), min(columnar), min(finished)
    base_db = folder / "baseline0.duckdb"

    # Row-by-row INSERT on a sample (it is far too slow for all rows).
    sample = min(rows, 2000)
    with duckdb.connect(str(base_db)) as con:
        t = time.perf_counter()
        for r in data.slice(0, sample).to_pylist():
            con.execute("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        ["rowbyrow", *list(r.values())[1:]])
        row_by_row = (time.perf_counter() - t) / sample * rows

    collector_total = spooled + ingested
    return {
        "rows": rows,
        "bulk_rows_per_s": rows / bulk,
        "collector_rows_per_s": rows / collector_total,
        "collector_ingest_only_rows_per_s": rows / ingested,
        "row_by_row_rows_per_s": rows / row_by_row,
        "collector_vs_bulk": bulk / collector_total,
        "columnar_rows_per_s": rows / columnar,
        "columnar_vs_bulk": bulk / columnar,
        "bulk_vs_row_by_row": row_by_row / bulk,
        "finish_s": finished,
        "finish_vs_ingest": finished / ingested,
    }


def log_step(run: collector.Run, data: pa.Table) -> None:
    """One log_step call per row, as a hand-written training loop would."""
    cols = {k: data.column(k).to_pylist() for k in data.column_names if k != "run_id"}
    for i in range(data.num_rows):
        run.log_step(cols["step"][i], examples=cols["examples"][i], loss=cols["loss"][i], lr=0.1, batch_size=32,
                     g_small_sq=cols["g_small_sq"][i], b_small=16.0, g_big_sq=cols["g_big_sq"][i], b_big=32.0,
                     b_simple=cols["b_simple"][i], wall_time=cols["wall_time"][i])


def log_blocks(run: collector.Run, data: pa.Table, block: int = 1000) -> None:
    """log_steps with blocks of numpy columns, as the trainer hands over its device-side statistics."""
    cols = {k: data.column(k).to_numpy() for k in data.column_names if k != "run_id"}
    for lo in range(0, data.num_rows, block):
        run.log_steps({k: v[lo:lo + block] for k, v in cols.items()})


def _collector_ingest(data: pa.Table, db: Path, fill) -> tuple[float, float, float]:
    """(seconds to spool, to ingest, to finish) for rows first buffered by `fill` (outside the timing).
    finish() has nothing left to move: it is the end-of-run read-back check plus the spool's removal."""
    rows = data.num_rows
    run = collector.start_run(db, name="bench", flush_every=3600)
    time.sleep(0.5)  # let the first heartbeat write happen outside the timed part
    fill(run, data)
    t = time.perf_counter()
    run._spool_buffers()  # buffered rows -> Arrow -> durable segment file
    spooled = time.perf_counter() - t
    t = time.perf_counter()
    assert run._try_ingest()  # segment -> DuckDB (bulk INSERT, one transaction)
    ingested = time.perf_counter() - t
    t = time.perf_counter()
    run.finish()
    finished = time.perf_counter() - t
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM steps").fetchall()[0][0] == rows
    return spooled, ingested, finished


def bench_log_step(calls: int, folder: Path) -> dict:
    """Cost of one log_step call inside a loop, net of the loop itself."""
    run = collector.start_run(folder / "calls.duckdb", name="calls", flush_every=3600)
    loss = 0.5
    t = time.perf_counter()
    for _ in range(calls):
        pass
    empty = time.perf_counter() - t
    t = time.perf_counter()
    for step in range(calls):
        run.log_step(step, examples=step * 32, loss=loss, lr=0.1, batch_size=32)
    basic = time.perf_counter() - t
    t = time.perf_counter()
    for step in range(calls, 2 * calls):
        run.log_step(step, examples=step * 32, loss=loss, lr=0.1, batch_size=32, g_small_sq=1.0, b_small=16,
                     g_big_sq=0.5, b_big=32, b_simple=40.0)
    full = time.perf_counter() - t
    run.finish()
    return {"calls": calls, "log_step_us": (basic - empty) / calls * 1e6,
            "log_step_with_gns_us": (full - empty) / calls * 1e6}


def bench_readers(n_writers: int, seconds: float, folder: Path, code: Path = ROOT, rate: float = 1000,
                  dashboard: bool = False) -> dict:
    """n trainer-like writers (tests/collector_workers.py paced_writer: `rate` steps/s, evals and scalars)
    on one store, beside an analyst's plain `duckdb.connect(db, read_only=True)` loop (every 50 ms): the
    share of the reader's tries that got in, and whether every logged step was stored. `code` is the
    checkout whose collector the writers use (the same workload on older code). With `dashboard`, this
    checkout's dashboard server runs too, polled like a few live pages (the live tick and the runs grid
    every 0.5 s): its response times and statuses."""
    db = folder / f"readers{n_writers}-{code.name}.duckdb"
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "BATCHSCOPE_TRACE_INGEST": "1"}
    subprocess.run([sys.executable, "-c", "import sys; from collector.store import write_connection\n"
                    "with write_connection(sys.argv[1]): pass", str(db)], env=env, cwd=code, check=True)  # its schema
    spawn = [sys.executable, str(WORKERS)]
    server = _start_dashboard(db, folder) if dashboard else None
    reader = subprocess.Popen([*spawn, "plain_reader", str(db), str(seconds + 3)], env=env, cwd=code,
                              stdout=subprocess.PIPE, text=True)
    writers = [subprocess.Popen([*spawn, "paced_writer", str(db), f"w{i}", str(seconds), str(rate)], env=env,
                                cwd=code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(n_writers)]
    page = _poll_dashboard(server, writers) if server is not None else {}
    logged, turns = {}, []
    for w in writers:
        out, err = w.communicate(timeout=seconds * 10 + 120)
        if w.returncode != 0:
            raise RuntimeError(f"writer failed: {err}")
        run_id, n = out.split()
        logged[run_id] = int(n)
        turns += _trace(err)
    tries, ok = map(int, reader.communicate(timeout=120)[0].split())
    with duckdb.connect(str(db), read_only=True) as con:
        stored = dict(con.execute("SELECT run_id, count(DISTINCT step) FROM steps GROUP BY run_id").fetchall())
    return {"writers": n_writers, "tries": tries, "ok": ok, "share": ok / tries, "logged": sum(logged.values()),
            "stored": sum(stored.get(r, 0) for r in logged), "all_stored": stored == logged, **_turns(turns), **page}


def _start_dashboard(db: Path, folder: Path):
    sys.path.insert(0, str(ROOT))
    from tests.dashboard_server import start_server

    return start_server(db, folder)


def _poll_dashboard(server, writers: list[subprocess.Popen]) -> dict:
    """Poll the dashboard as a few live pages would while the writers live; then stop it."""
    times, statuses, i = [], [], 0
    try:
        while any(w.poll() is None for w in writers):
            i += 1
            for output, inputs in (("live-badge.children", {"live-interval.n_intervals": i}),
                                   ("runs-grid.rowData", {"store-version.data": f"v{i}"})):
                t = time.perf_counter()
                statuses.append(server.callback(output, inputs).status)
                times.append(time.perf_counter() - t)
            time.sleep(0.5)
    finally:
        server.stop()
    return {"requests": len(times), "p50": float(np.median(times)), "p95": float(np.percentile(times, 95)),
            "errors_5xx": sum(s >= 500 for s in statuses)}


def _trace(stderr: str) -> list[tuple[float, float]]:
    """(end time, seconds held) of each ingest turn that wrote, from BATCHSCOPE_TRACE_INGEST lines."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("ingest-trace"):
            f = dict(kv.split("=", 1) for kv in line.split()[1:])
            if float(f["held"]) > 0:
                out.append((float(f["t"]), float(f["held"])))
    return out


def _turns(turns: list[tuple[float, float]]) -> dict:
    """Held time per turn (median, 90th percentile) and time between turns (median, max): how long a
    plain reader may find the store taken, and how far the store lags the spools."""
    if len(turns) < 2:
        return {"turns": len(turns)}
    turns.sort()
    held = np.array([h for _, h in turns])
    gaps = np.diff([t for t, _ in turns])
    return {"turns": len(turns), "held_med": float(np.median(held)), "held_p90": float(np.percentile(held, 90)),
            "gap_med": float(np.median(gaps)), "gap_max": float(gaps.max()),
            "held_share": float(held.sum() / (turns[-1][0] - turns[0][0] + held[0]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--calls", type=int, default=1_000_000)
    p.add_argument("--readers", metavar="N,M", help="only the plain-reader test, with N (then M, ...) writers")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the writers log (--readers)")
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose collector the writers use (--readers)")
    p.add_argument("--dashboard", action="store_true", help="run this checkout's dashboard beside them (--readers)")
    args = p.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()} "
          f"duckdb {duckdb.__version__}, load average {os.getloadavg()[0]:.1f}")
    if args.readers:
        with tempfile.TemporaryDirectory() as tmp:
            for n in map(int, args.readers.split(",")):
                r = bench_readers(n, args.seconds, Path(tmp), args.code.resolve(), dashboard=args.dashboard)
                print(f"plain duckdb reader beside {n} writers (1,000 steps/s each, {args.seconds:g} s, code "
                      f"{args.code}): {r['share']:.1%} of {r['tries']} tries got in; "
                      f"{r['stored']:,} of {r['logged']:,} logged steps stored")
                if "p95" in r:
                    print(f"  dashboard ({r['requests']} requests): p50 {r['p50'] * 1000:.0f} ms, p95 "
                          f"{r['p95'] * 1000:.0f} ms, {r['errors_5xx']} answered 5xx")
                if r["turns"] >= 2:
                    print(f"  {r['turns']} ingest turns: store held {r['held_med'] * 1000:.0f} ms per turn (median; "
                          f"p90 {r['held_p90'] * 1000:.0f} ms), turns {r['gap_med']:.1f} s apart (median; max "
                          f"{r['gap_max']:.1f} s), held {r['held_share']:.1%} of the time")
        return
    with tempfile.TemporaryDirectory() as tmp:
        ing = bench_ingest(args.rows, Path(tmp))
        calls = bench_log_step(args.calls, Path(tmp))
    print(f"ingest {ing['rows']:,} step rows (best of 3 each):")
    print(f"  DuckDB bulk Arrow insert      {ing['bulk_rows_per_s']:>14,.0f} rows/s  (baseline)")
    print(f"  collector spool + ingest      {ing['collector_rows_per_s']:>14,.0f} rows/s  "
          f"= {ing['collector_vs_bulk']:.2f} x baseline (goal >= 0.5)")
    print(f"    of which ingest only        {ing['collector_ingest_only_rows_per_s']:>14,.0f} rows/s")
    print(f"  collector, columnar log_steps {ing['columnar_rows_per_s']:>14,.0f} rows/s  "
          f"= {ing['columnar_vs_bulk']:.2f} x baseline (the trainer's path)")
    print(f"  row-by-row INSERT (sampled)   {ing['row_by_row_rows_per_s']:>14,.0f} rows/s  "
          f"(bulk is {ing['bulk_vs_row_by_row']:,.0f} x faster)")
    print(f"  finish() after that (read-back check, spool removal) {ing['finish_s'] * 1000:.0f} ms "
          f"= {ing['finish_vs_ingest']:.2f} x the ingest itself")
    print(f"log_step cost over {calls['calls']:,} calls: {calls['log_step_us']:.2f} us (5 fields), "
          f"{calls['log_step_with_gns_us']:.2f} us (with the 5 noise-scale fields); goal < 5 us")


if __name__ == "__main__":
    main()
