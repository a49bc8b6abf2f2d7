"""The same runs in TensorBoard and in batchscope: time from a cold process to every run's loss curve.

    pip install tensorboard                  # not a batchscope dependency; only this script needs it
    python bench/bench_tensorboard.py        # 100 runs x 10,000 steps (built once into bench/out/tb/)
    python bench/bench_tensorboard.py --runs 20 --steps 2000      # a quick look

One store is made by dashboard.synthetic; the training loss of each of its runs is then written with
torch.utils.tensorboard.SummaryWriter, one event file per run, as a TensorBoard user would have it.
Each measurement runs in a fresh Python process (nothing cached in memory; the files are in the OS
page cache for both tools, since both were just written or read):

- tensorboard server: `tensorboard --logdir` (the Rust data server, TensorBoard's default loader),
  from launch until the HTTP API serves the loss of every run up to its last step. TensorBoard keeps a
  reservoir sample of 1,000 points per run and tag, so that is what it serves. Also reported: the time
  until the server answers at all (its start-up, before any data).
- tensorboard python loader: EventAccumulator (the `--load_fast=false` path, also what notebooks use),
  with its default size guidance (a 10,000-point reservoir per tag) and with every point.
- batchscope curves: the Curves page's query (dashboard.queries.step_curves, ≤ 1,500 bucket means per
  run, every metric against every x axis in one query) for all runs.
- batchscope all points: every step row of the loss, read into polars.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TB_SERVER_TIMEOUT_S = 600


def build(out: Path, runs: int, steps: int) -> tuple[Path, Path, list[str]]:
    """The store and the TensorBoard log dir with the same losses (built once, reused)."""
    import duckdb

    from dashboard.synthetic import make_store

    db, logdir = out / "store.duckdb", out / "logs"
    if not db.exists():
        out.mkdir(parents=True, exist_ok=True)
        make_store(db, n_runs=runs, steps=steps, seeds=1, sweep="tb", eval_every=max(1, steps // 40))
    with duckdb.connect(str(db), read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()]
        if not logdir.exists():
            from torch.utils.tensorboard import SummaryWriter

            t0 = time.perf_counter()
            tmp = out / "logs.tmp"
            for rid in ids:
                rows = con.execute("SELECT step, loss FROM steps WHERE run_id = ? AND isfinite(loss) ORDER BY step",
                                   [rid]).fetchall()
                with SummaryWriter(str(tmp / rid)) as writer:
                    for step, loss in rows:
                        writer.add_scalar("loss", loss, step)
            tmp.rename(logdir)
            print(f"wrote TensorBoard event files in {time.perf_counter() - t0:.0f} s", flush=True)
    return db, logdir, ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def tb_server(logdir: Path, last_steps: dict[str, int]) -> dict[str, float]:
    """Launch `tensorboard --logdir` and poll its HTTP API until every run's loss reaches its last step."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
                             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = None
    try:
        done: set[str] = set()
        points = 0
        while time.perf_counter() - t0 < TB_SERVER_TIMEOUT_S:
            try:
                tags = _get(f"{base}/tags")
            except OSError:
                time.sleep(0.05)
                continue
            ready = ready or time.perf_counter() - t0
            for run in tags:
                if run in done or "loss" not in tags[run]:
                    continue
                series = _get(f"{base}/scalars?run={run}&tag=loss")
                if series and series[-1][1] >= last_steps[run]:
                    done.add(run)
                    points += len(series)
            if len(done) == len(last_steps):
                return {"ready_s": ready, "all_runs_s": time.perf_counter() - t0, "points": points}
            time.sleep(0.05)
        raise TimeoutError(f"tensorboard served {len(done)} of {len(last_steps)} runs in {TB_SERVER_TIMEOUT_S} s")
    finally:
        proc.terminate()
        proc.wait()


# (imports, body) per loader: the body is timed; it leaves the number of points loaded in `n`.
CHILD = {
    "tb_python_default": (
        "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator",
        """n = 0
for d in sorted(pathlib.Path(ARG).iterdir()):
    acc = EventAccumulator(str(d)); acc.Reload(); n += len(acc.Scalars("loss"))"""),
    "tb_python_all": (
        "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator",
        """n = 0
for d in sorted(pathlib.Path(ARG).iterdir()):
    acc = EventAccumulator(str(d), size_guidance={"scalars": 0}); acc.Reload(); n += len(acc.Scalars("loss"))"""),
    "batchscope_curves": (
        "from dashboard import queries",
        """db = pathlib.Path(ARG)
with queries.connect(db) as con:
    ids = [r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()]
n = queries.step_curves(db, ids, "loss", "step").height"""),
    "batchscope_all": (
        "from collector.store import read_connection",
        """with read_connection(ARG) as con:
    n = con.sql("SELECT run_id, step, loss FROM steps WHERE isfinite(loss)").pl().height"""),
}


def in_child(name: str, arg: Path) -> dict[str, float]:
    """Run one loader in a fresh process, timed after its imports."""
    imports, body = CHILD[name]
    code = (f"import json, pathlib, sys, time\n{imports}\nARG = sys.argv[1]\nt0 = time.perf_counter()\n{body}\n"
            "print(json.dumps({'seconds': time.perf_counter() - t0, 'points': n}))\n")
    res = subprocess.run([sys.executable, "-c", code, str(arg)], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    try:
        import tensorboard
    except ImportError:
        sys.exit("error: this benchmark needs TensorBoard: pip install tensorboard")

    out = ROOT / "bench" / "out" / f"tb-{args.runs}x{args.steps}"
    db, logdir, ids = build(out, args.runs, args.steps)
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        last = dict(con.execute("SELECT run_id, max(step) FROM steps WHERE isfinite(loss) GROUP BY run_id").fetchall())
        n_rows = con.execute("SELECT count(*) FROM steps").fetchall()[0][0]
    tb_bytes = sum(f.stat().st_size for f in logdir.rglob("*") if f.is_file())
    print(f"# {platform.machine()}, {platform.python_version()}, tensorboard {tensorboard.__version__}; "
          f"{len(ids)} runs, {n_rows:,} step rows; event files {tb_bytes / 1e6:.0f} MB, "
          f"DuckDB store {db.stat().st_size / 1e6:.0f} MB (all columns); median of {args.repeat}", flush=True)

    results: dict[str, list[dict]] = {}
    for _ in range(args.repeat):  # interleaved, so a busy moment hits every loader alike
        results.setdefault("tensorboard server", []).append(tb_server(logdir, last))
        results.setdefault("tensorboard python (default: 10,000-point reservoir)", []).append(in_child("tb_python_default", logdir))
        results.setdefault("tensorboard python (every point)", []).append(in_child("tb_python_all", logdir))
        results.setdefault("batchscope curves query (<=1,500 points per run)", []).append(
            in_child("batchscope_curves", db))
        results.setdefault("batchscope every point (polars)", []).append(in_child("batchscope_all", db))

    base = statistics.median(r["seconds"] for r in results["batchscope curves query (<=1,500 points per run)"])
    print("| loader | seconds to every run's loss | x batchscope curves | points |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        key = "all_runs_s" if name == "tensorboard server" else "seconds"
        sec = statistics.median(r[key] for r in rows)
        print(f"| {name} | {sec:.2f} | {sec / base:.1f} | {rows[0]['points']:,} |")
    ready = statistics.median(r["ready_s"] for r in results["tensorboard server"])
    print(f"\ntensorboard server answering (before data): {ready:.2f} s after launch; the row above counts from launch.")


if __name__ == "__main__":
    main()
