"""Remote logging over loopback: W writer processes x S steps into one dashboard (embedded receiver,
--auth) while a reader polls its pages; then the same writers into a local store (spool + the single
ingester), in the same run; then log_step's cost with a remote and with a local store.

    python bench/bench_remote.py                        # 32 writers x 20,000 steps (the issue's case)
    python bench/bench_remote.py --writers 4 --steps 5000

Each writer imports the collector, then waits for a go file (so imports are not timed), logs S steps
(an eval and a scalar every 500) as fast as it can, and ends its run. Rows/s = all rows / (go -> the
last writer's run stored and checked). The page reader times, one after another, the runs page's
callback (runs_rows + sweep cards), the shell's live tick and GET /, and reports p50/p95 per kind.
Every run is then read back from the DuckDB file: each step, eval and scalar must be there exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dashboard_server import Server, start_server  # noqa: E402

TOKEN = "bench-remote"
WRITER = """
import json, os, sys, time, collector
db, name, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
open(f"{go}.{name}.ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
t0 = time.time()
with collector.start_run(db, name=name, sweep="bench-remote", batch_size=32, lr=0.1) as run:
    t1 = time.perf_counter()
    for s in range(1, n + 1):
        run.log_step(s, examples=32 * s, loss=1.0 / s, lr=0.1, batch_size=32, g_small_sq=2.0, b_small=1.0,
                     g_big_sq=1.5, b_big=32.0)
        if s % 500 == 0:
            run.log_eval(s, split="test", loss=1.0 / s, accuracy=0.5)
            run.log(s, grad_norm=float(s))
    loop = time.perf_counter() - t1
print(json.dumps({"run_id": run.run_id, "start": t0, "end": time.time(), "loop_s": loop, "status": run._status}))
"""


def pct(values: list[float], q: int) -> float:
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_writers(db: str, writers: int, steps: int, tmp: Path, env: dict,
                on_go=lambda: None) -> tuple[float, list[dict]]:
    """Start the writers, let them import, say go; (seconds from go to the last run stored, their reports)."""
    go = tmp / f"go-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db, f"w{i:02d}", str(steps), str(go)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(writers)]
    deadline = time.monotonic() + 600
    while len(list(tmp.glob(f"{go.name}.*.ready"))) < writers and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a writer exited early: {[p.communicate()[1][-500:] for p in procs if p.poll()]}")
        time.sleep(0.2)
    t0 = time.time()
    go.touch()
    on_go()
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0 or not out.strip():
            raise RuntimeError(f"writer failed ({p.returncode}): {err[-2000:]}")
        if err.strip():
            print(f"  writer stderr: {err.strip()[:300]}", flush=True)
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return max(r["end"] for r in reports) - t0, reports


def check(db: Path, reports: list[dict], steps: int) -> str:
    from tests.test_remote import stored

    ids = [r["run_id"] for r in reports]
    got = {run_id: counts[1:] for run_id, counts in stored(db, "bench-remote", timeout=120).items()}
    want = ("finished", steps, steps, steps // 500, steps // 500)
    bad = {i: got.get(i) for i in ids if got.get(i) != want}
    extra = set(got) - set(ids)
    total = sum(v[1] + v[3] + v[4] for v in got.values())
    if bad or extra:
        return f"MISMATCH: {len(bad)} run(s) wrong {list(bad.items())[:3]}, {len(extra)} unexpected"
    return f"{len(ids)} runs x {steps:,} steps: every step, eval and scalar exactly once ({total:,} rows), all finished"


class PagePoller(threading.Thread):
    """Times dashboard requests one after another until stopped."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.stop = server, threading.Event()
        self.times: dict[str, list[float]] = {"runs page": [], "live tick": [], "GET /": []}
        self.errors = 0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            for kind, call in (
                    ("runs page", lambda n=n: self.server.callback("runs-grid.rowData", {"store-version.data": f"v{n}"})),
                    ("live tick", lambda n=n: self.server.callback("live-badge.children", {"live-interval.n_intervals": n},
                                                               {"store-version.data": None})),
                    ("GET /", lambda: self.server.request("/"))):
                t0 = time.perf_counter()
                try:
                    ok = call().status == 200
                except OSError:
                    ok = False
                self.times[kind].append((time.perf_counter() - t0) * 1000)
                self.errors += not ok
            self.stop.wait(0.2)


def log_step_cost(db: str, n: int = 50_000, repeats: int = 5) -> float:
    """ns per log_step in this process (the writer's hot path), for a run on `db`: the best of `repeats`
    blocks of n calls (the machine is shared: the best block is the least disturbed one)."""
    import collector

    best = float("inf")
    with collector.start_run(db, name="log-step-cost", sweep="bench-log-step") as run:
        for r in range(repeats):
            t0 = time.perf_counter()
            for s in range(r * n + 1, (r + 1) * n + 1):
                run.log_step(s, examples=32 * s, loss=0.5, lr=0.1, batch_size=32, g_small_sq=2.0, b_small=1.0,
                             g_big_sq=1.5, b_big=32.0)
            best = min(best, (time.perf_counter() - t0) / n * 1e9)
    return best


def phase(label: str, db: Path, url: str | None, pages: Server, writers: int, steps: int, tmp: Path,
          env: dict) -> dict:
    """One set of writers into `url` (None: into the local store `db`) while `pages` is polled."""
    poller = PagePoller(pages)
    try:
        seconds, reports = run_writers(url or str(db), writers, steps, tmp, env, on_go=poller.start)
    finally:
        poller.stop.set()
        if poller.is_alive():
            poller.join()
    return {"label": label, "seconds": seconds, "check": check(db, reports, steps), "pages": poller,
            "loop_ns": statistics.median(r["loop_s"] / steps * 1e9 for r in reports)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20_000)
    a = ap.parse_args(argv)
    from tests.test_remote import TOKEN as SERVE_TOKEN
    from tests.test_remote import free_port, serve

    tmp = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCOPE_")}
    print(f"{a.writers} writers x {a.steps:,} steps; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}, python {platform.python_version()}; {tmp}", flush=True)
    results = []

    db = tmp / "embedded.duckdb"  # 1. the dashboard's embedded receiver takes the runs and serves the pages
    dash = start_server(db, tmp, "--auth", f"token:{TOKEN}", headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        env = base_env | {"BATCHSCOPE_TOKEN": TOKEN, "BATCHSCOPE_SPOOL": str(tmp / "client1")}
        results.append(phase("remote, dashboard's receiver", db, dash.url, dash, a.writers, a.steps, tmp, env))
    finally:
        dash.stop()

    db = tmp / "served.duckdb"  # 2. `collector serve` takes the runs, a dashboard beside it serves the pages
    receiver = serve(db, tmp, free_port())
    dash = start_server(db, tmp)
    try:
        env = base_env | {"BATCHSCOPE_TOKEN": SERVE_TOKEN, "BATCHSCOPE_SPOOL": str(tmp / "client2")}
        results.append(phase("remote, collector serve", db, receiver.url, dash, a.writers, a.steps, tmp, env))
    finally:
        dash.stop()

    db = tmp / "local.duckdb"  # 3. the baseline: local writers, spool + the single ingester
    dash = start_server(db, tmp)
    try:
        results.append(phase("local spool + ingest", db, None, dash, a.writers, a.steps, tmp, base_env))
    finally:
        dash.stop()

    try:  # log_step with the machine otherwise idle, remote and local alternately
        os.environ.update({"BATCHSCOPE_TOKEN": SERVE_TOKEN, "BATCHSCOPE_SPOOL": str(tmp / "client-cost")})
        costs: dict[str, list[float]] = {"remote": [], "local": []}
        for _ in range(3):
            costs["remote"].append(log_step_cost(receiver.url))
            costs["local"].append(log_step_cost(str(tmp / "cost.duckdb")))
    finally:
        receiver.stop()

    rows = a.writers * (a.steps + 2 * (a.steps // 500))
    base = results[-1]["seconds"]
    for r in results:
        print(f"{r['label']:30s} {r['check']}")
        print(f"{'':30s} go -> last run stored {r['seconds']:.1f} s: {rows / r['seconds']:,.0f} rows/s "
              f"({base / r['seconds']:.2f}x local); writers' loops median {r['loop_ns']:,.0f} ns/step "
              f"({a.writers} processes on {os.cpu_count()} cores)")
        for kind, times in r["pages"].times.items():
            if times:
                print(f"{'':30s} dashboard {kind:9s}: n={len(times)} p50 {pct(times, 50):.0f} ms, "
                      f"p95 {pct(times, 95):.0f} ms")
        print(f"{'':30s} dashboard request errors: {r['pages'].errors}")
    print("log_step alone (best of 5 x 50,000 calls, 3 alternating tries): "
          + ", ".join(f"{k} {min(v):.0f} ns (tries {', '.join(f'{x:.0f}' for x in v)})" for k, v in costs.items()))


if __name__ == "__main__":
    main()
