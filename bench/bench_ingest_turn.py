"""What one ingest turn costs: how long it holds the store (so how long a plain DuckDB reader is shut out).

    python bench/bench_ingest_turn.py [--code /path/to/other/checkout] [--runs 8] [--rows 100,1000,5000]

N live runs each have a new segment of R step rows (all noise columns) on a store that already holds
20,000 steps per run; one process takes `--reps` ingest turns (collector.ingester.ingest_locked) and
prints the store-held time of each (BATCHSCOPE_TRACE_INGEST: from the open that succeeded to after the
close, checkpoint included) and the process CPU time per turn. With `--code`, the same workload runs on
that checkout's collector too, alternately (ABBA) in the same run, so load on the machine hits both alike.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def worker(n_runs: int, rows: int, reps: int, folder: Path) -> None:
    """Run in a subprocess whose PYTHONPATH picks the collector under test; prints one CPU time per turn
    (the held times go to stderr as trace lines)."""
    import pyarrow as pa

    from collector import ingester
    from collector.spool import Spool
    from collector.store import spool_root, write_connection

    db = folder / "turns.duckdb"
    with write_connection(db):
        pass
    spools = []
    for i in range(n_runs):
        spool = Spool(spool_root(db), f"run{i:09d}", keep_ingested=False)
        spool.create_and_own()  # alive: its rows go in, its run keeps spooling
        spool.write_run({"run_id": spool.run_id, "name": f"w{i}", "status": "running", "batch_size": 32, "lr": 0.1})
        spools.append(spool)
    rng = np.random.default_rng(0)
    first = 1

    def fill(n: int) -> None:
        nonlocal first
        step = np.arange(first, first + n)
        for spool in spools:
            spool.write_segment("steps", pa.table({
                "step": step, "examples": step * 32, "wall_time": step * 0.001,
                "batch_size": pa.array(np.full(n, 32, dtype=np.int32)), "lr": np.full(n, 0.1),
                "loss": rng.random(n), "g_small_sq": rng.random(n), "b_small": np.full(n, 16.0),
                "g_big_sq": rng.random(n), "b_big": np.full(n, 32.0), "b_simple": rng.random(n)}))
        first += n

    lease = ingester.Lease(db)
    assert lease.acquire(10)
    fill(20_000)
    ingester.ingest_locked(db, lease)  # the history, and this process's first-use costs
    print("start", file=sys.stderr, flush=True)
    for _ in range(reps):
        fill(rows)
        cpu = time.process_time()
        summary = ingester.ingest_locked(db, lease)
        print(f"{time.process_time() - cpu:.6f}", flush=True)
        assert summary.rows == n_runs * rows and not summary.busy, summary


def _one(code: Path, n_runs: int, rows: int, reps: int) -> tuple[list[float], list[float]]:
    """(held s per turn, CPU s per turn) of `reps` turns on `code`'s collector, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(code), "BATCHSCOPE_TRACE_INGEST": "1", "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, __file__, "--worker", str(n_runs), str(rows), str(reps), tmp],
                             env=env, cwd=code, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    after_start = res.stderr.split("start\n", 1)[1]
    held = [float(kv.split("=")[1]) for line in after_start.splitlines() if line.startswith("ingest-trace")
            for kv in line.split() if kv.startswith("held=")]
    return held, [float(x) for x in res.stdout.split()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--code", type=Path, help="another checkout to compare with (e.g. the code before a change)")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--rows", default="100,1000,5000", help="new step rows per run per turn")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        n_runs, rows, reps, folder = args.worker
        worker(int(n_runs), int(rows), int(reps), Path(folder))
        return
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    codes = {"this checkout": ROOT} | ({f"{args.code}": args.code.resolve()} if args.code else {})
    for rows in map(int, args.rows.split(",")):
        held: dict[str, list[float]] = {k: [] for k in codes}
        cpu: dict[str, list[float]] = {k: [] for k in codes}
        order = list(codes) + list(reversed(codes))  # ABBA
        for name in order:
            h, c = _one(codes[name], args.runs, rows, args.reps)
            held[name] += h
            cpu[name] += c
        for name in codes:
            print(f"{args.runs} runs x {rows:,} rows per turn, {name}: store held {np.median(held[name]) * 1000:.0f} ms "
                  f"per turn (median of {len(held[name])}; p90 {np.percentile(held[name], 90) * 1000:.0f} ms), "
                  f"CPU {np.median(cpu[name]) * 1000:.0f} ms per turn")
        if args.code:
            a, b = (np.median(held[k]) for k in codes)
            print(f"  held: this checkout / other = {a / b:.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
