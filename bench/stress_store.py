"""Stress the store's integrity: many processes writing (and reading) one DuckDB file, rounds counted.

    python bench/stress_store.py writers [--rounds 40] [--writers 16] [--steps 5000] [--readers 2]
    python bench/stress_store.py create [--rounds 60]
    python bench/stress_store.py forced                  # the race made certain with strace (needs strace)
    python bench/stress_store.py writers --code /path/to/older/checkout   # the same stress on other code

`writers`: N writer processes (tests/collector_workers.py) log S steps each into a new store while R
readers query it; a round is lost if any writer's steps, evals or final status are not all there, and
"repaired" if a writer's end-of-run check had to write rows again. `create`: 8 processes create the
same new store at once and each commits one row, once through plain `duckdb.connect` and once through
batchscope's `write_connection`; a round is lost if a committed row is missing. `forced`: process B
finds no store, then strace holds its create-open for 3 s while process A creates the store and
commits; B then goes on; does A's row survive? Load the cores with
other work (e.g. `python -c "while True: pass" &` twice) to widen the race windows.
Not a speed benchmark: it counts lost commits. Results: bench/store_integrity.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.collector_workers import CREATE_AND_WRITE, start_held_in_create  # noqa: E402

PLAIN = """
import duckdb, os, random, sys, time
deadline = time.monotonic() + 60
while True:
    try:
        con = duckdb.connect(sys.argv[1])
        break
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower() or time.monotonic() > deadline:
            raise
        time.sleep(random.random() * 0.01)
con.execute("CREATE TABLE IF NOT EXISTS t (pid INT)")
con.execute("INSERT INTO t VALUES (?)", [os.getpid()])
con.close()
"""


def _env(code: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}


def _popen(args: list[str], code: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=code, env=_env(code), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def writers_round(db: Path, code: Path, writers: int, steps: int, readers: int, reader_seconds: float) -> tuple[bool, bool]:
    """(lost, repaired) for one round."""
    worker = ["-m", "tests.collector_workers"]
    rs = [_popen([*worker, "reader", str(db), str(reader_seconds)], code) for _ in range(readers)]
    ws = [_popen([*worker, "writer", str(db), f"w{i}", str(steps)], code) for i in range(writers)]
    outs = [w.communicate() for w in ws]
    for r in rs:
        r.communicate()
    if any(w.returncode for w in ws):
        raise RuntimeError("a writer failed: " + next(err for (_, err), w in zip(outs, ws, strict=True) if w.returncode))
    try:
        with duckdb.connect(str(db), read_only=True) as con:
            got = dict(con.execute("SELECT run_id, count(*) FROM steps GROUP BY ALL").fetchall())
            evals = dict(con.execute("SELECT run_id, count(*) FROM evals GROUP BY ALL").fetchall())
            status = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    except duckdb.Error as exc:  # the store itself was left unreadable: every run in it is lost
        print(f"  store unreadable ({str(exc).splitlines()[0]}); writers said: "
              f"{sorted({err.strip().splitlines()[0][:160] for _, err in outs if err.strip()})}", flush=True)
        return True, False
    lost = any((got.get(out.strip()), evals.get(out.strip()), status.get(out.strip())) != (steps, steps // 1000, "finished")
               for out, _ in outs)
    return lost, any("lacked rows" in err for _, err in outs)


def create_round(folder: Path, code: Path, script: str, table: str) -> bool:
    """True if a committed row is missing after 8 processes created the store at once."""
    db = folder / "runs.duckdb"
    procs = [_popen(["-c", script, str(db)], code) for _ in range(8)]
    outs = [p.communicate() for p in procs]
    ok = sum(p.returncode == 0 for p in procs)
    if ok < 8:
        raise RuntimeError(next(err for (_, err), p in zip(outs, procs, strict=True) if p.returncode))
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0] != ok


def forced_round(folder: Path, code: Path, script: str, table: str) -> tuple[int, int]:
    """(rows committed, rows in the store) when B is held between "no file" and creating it while A writes."""
    db, trace = folder / "runs.duckdb", folder / "strace.log"
    b = start_held_in_create(db, trace, [sys.executable, "-c", script, str(db)], cwd=code, env=_env(code),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a = subprocess.run([sys.executable, "-c", script, str(db)], cwd=code, env=_env(code), capture_output=True)
    committed = (a.returncode == 0) + (b.wait() == 0)
    with duckdb.connect(str(db), read_only=True) as con:
        return committed, con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["writers", "create", "forced"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--writers", type=int, default=16)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--readers", type=int, default=2)
    p.add_argument("--reader-seconds", type=float, default=12)
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose collector the workers run")
    a = p.parse_args()
    rounds = "" if a.mode == "forced" else f" {a.rounds} rounds,"
    print(f"{a.mode}:{rounds} load average {os.getloadavg()[0]:.1f} at start, code {a.code}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if a.mode == "writers":
            lost = repaired = 0
            for i in range(a.rounds):
                db = Path(tmp) / f"r{i}" / "runs.duckdb"
                db.parent.mkdir()
                round_lost, round_repaired = writers_round(db, a.code, a.writers, a.steps, a.readers, a.reader_seconds)
                lost, repaired = lost + round_lost, repaired + round_repaired
                print(f"round {i + 1}: {'LOST' if round_lost else 'ok'}{' (repaired)' if round_repaired else ''}", flush=True)
            print(f"{a.writers} writers x {a.steps} steps + {a.readers} readers: rows lost in {lost} of {a.rounds} "
                  f"rounds; end-of-run repair needed in {repaired}")
        elif a.mode == "forced":
            for name, script, table in (("plain duckdb.connect", PLAIN, "t"),
                                        ("batchscope write_connection", CREATE_AND_WRITE, "scalars")):
                folder = Path(tmp) / table
                folder.mkdir()
                committed, stored = forced_round(folder, a.code, script, table)
                print(f"{name}: {committed} processes committed, {stored} row(s) in the store")
        else:
            counts = {"plain duckdb.connect": 0, "batchscope write_connection": 0}
            for i in range(a.rounds):
                for name, script, table in (("plain duckdb.connect", PLAIN, "t"),
                                            ("batchscope write_connection", CREATE_AND_WRITE, "scalars")):
                    folder = Path(tmp) / f"{i}-{table}"
                    folder.mkdir()
                    counts[name] += create_round(folder, a.code, script, table)
            for name, n in counts.items():
                print(f"8 processes create one store at once, {name}: a committed row lost in {n} of {a.rounds} rounds")


if __name__ == "__main__":
    main()
