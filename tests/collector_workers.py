"""Subprocess entry points for the collector's concurrency and crash tests (run with `python -m`)."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import duckdb

import collector
from collector.store import StoreError, read_connection

# One commit of one row through write_connection: `python -c CREATE_AND_WRITE <db>` (run as a script so
# that bench/stress_store.py can run it against another checkout's collector).
CREATE_AND_WRITE = """
import os, sys
from collector.store import write_connection
with write_connection(sys.argv[1], timeout=60) as con:
    con.execute("INSERT INTO scalars (run_id, step, name, value) VALUES (?, 1, 'pid', 1.0)", [str(os.getpid())])
print("committed")
"""


def start_held_in_create(db: Path, trace: Path, command: list[str], **popen) -> subprocess.Popen:
    """Start `command` under strace, which holds its create-open of `db` (the 3rd openat of that path,
    after DuckDB's two "does it exist" checks) for 3 s; return once it is held there."""
    proc = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), "-P", str(db), "-e", "trace=openat",
                             "-e", "inject=openat:delay_enter=3000000:when=3", *command], **popen)
    deadline = time.monotonic() + 60
    while "O_CREAT" not in (trace.read_text() if trace.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the process was not held in its create-open: {proc.communicate()}")
        time.sleep(0.02)
    return proc


def writer(db: str, name: str, n_steps: int, evals_every: int = 1000) -> None:
    """Log n_steps steps as fast as a hot loop would, plus periodic evals and a scalar."""
    with collector.start_run(db, name=name, sweep="concurrency", config={"n": n_steps}, batch_size=32, lr=0.1) as run:
        for step in range(1, n_steps + 1):
            run.log_step(step, examples=32 * step, loss=1.0 / step, lr=0.1, batch_size=32,
                         g_small_sq=2.0, b_small=16.0, g_big_sq=1.5, b_big=32.0)
            if step % evals_every == 0:
                run.log_eval(step, split="test", loss=1.0 / step, accuracy=0.5)
                run.log(step, grad_norm=float(step))
        print(run.run_id, flush=True)


def reader(db: str, seconds: float) -> None:
    """Query in a loop like a dashboard would; print the number of queries and of errors."""
    deadline = time.monotonic() + seconds
    queries = errors = 0
    while time.monotonic() < deadline:
        try:
            with read_connection(db, timeout=30) as con:
                con.execute("SELECT status, count(*) FROM run_summary GROUP BY ALL").fetchall()
                con.execute("SELECT run_id, max(step) FROM steps GROUP BY run_id").fetchall()
            queries += 1
        except StoreError as exc:
            if "no store" not in str(exc):
                errors += 1
                print(f"reader error: {exc}", file=sys.stderr, flush=True)
        except duckdb.Error as exc:
            errors += 1
            print(f"reader error: {exc}", file=sys.stderr, flush=True)
        time.sleep(0.02)
    print(f"{queries} {errors}", flush=True)


def slow_writer(db: str, ready_file: str) -> None:
    """Log steps slowly and announce, once some were flushed, that it can be killed."""
    run = collector.start_run(db, name="to-be-killed", batch_size=8, lr=0.1, flush_every=0.2)
    step = 0
    announced = False
    while True:
        step += 1
        run.log_step(step, examples=8 * step, loss=1.0, lr=0.1, batch_size=8)
        time.sleep(0.002)
        if step >= 500 and not announced:
            deadline = time.monotonic() + 60
            while run.spool.rows_written["steps"] < 500 and time.monotonic() < deadline:
                time.sleep(0.05)  # let the flusher spool them (a tick is 0.2 s; slower on a loaded machine)
            with open(ready_file, "w") as f:
                f.write(run.run_id)
            announced = True


def fill_disk(path: Path) -> None:
    """Fill the file system holding `path` up to the last byte (the test frees it by deleting the file)."""
    with open(path, "wb", buffering=0) as f:  # unbuffered: no write is left for close() to fail on
        for chunk in (65536, 512):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())


def disk_full_writer(db: str, filler: str, free_at_end: bool) -> None:
    """Log steps, fill the disk, keep logging, then (free_at_end) free it and log more; print the
    run id and the number of steps logged."""
    with collector.start_run(db, name="disk", flush_every=0.2, finish_timeout=3) as run:
        step = 0

        def steps(n: int) -> None:
            nonlocal step
            for _ in range(n):
                step += 1
                run.log_step(step, examples=step * 8, loss=1.0 / step, lr=0.1, batch_size=8)
                if step % 200 == 0:
                    time.sleep(0.01)

        steps(4000)
        time.sleep(1.5)  # spooled and ingested
        fill_disk(Path(filler))
        steps(30000)  # the disk is full: spool writes and the store fail; the loop goes on
        time.sleep(1.5)
        if free_at_end:
            Path(filler).unlink()  # space returns mid-run
            steps(4000)
        print(run.run_id, step, flush=True)


def paced_writer(db: str, name: str, seconds: float, rate: float) -> None:
    """A trainer-like writer: `rate` steps per second (the rest of each step is 'compute'), an eval and
    a scalar every 500 steps, for `seconds`; prints its run id and the steps it logged."""
    with collector.start_run(db, name=name, sweep="paced", batch_size=32, lr=0.1) as run:
        t0 = time.monotonic()
        step = 0
        while time.monotonic() - t0 < seconds:
            step += 1
            run.log_step(step, examples=32 * step, loss=1.0 / step, lr=0.1, batch_size=32, g_small_sq=2.0,
                         b_small=16.0, g_big_sq=1.5, b_big=32.0)
            if step % 500 == 0:
                run.log_eval(step, split="test", loss=1.0 / step, accuracy=0.5)
                run.log(step, grad_norm=float(step))
            lag = t0 + step / rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
    print(run.run_id, step, flush=True)


def plain_reader(db: str, seconds: float) -> None:
    """An analyst's plain DuckDB client: connect read-only, query, close, every 50 ms; prints the number
    of tries and of successes (a try fails when a writer has the file open)."""
    deadline = time.monotonic() + seconds
    tries = ok = 0
    while time.monotonic() < deadline:
        tries += 1
        try:
            with duckdb.connect(db, read_only=True) as con:
                con.execute("SELECT count(*) FROM steps").fetchall()
            ok += 1
        except duckdb.Error:
            pass
        time.sleep(0.05)
    print(tries, ok, flush=True)


PROGRESS = struct.Struct("qqddq")  # last step logged, loop finished (0/1), steps/s so far, its wall_time, pid


def signal_writer(db: str, progress: str, n_steps: int) -> None:
    """Log steps in a hot loop, publishing each accepted step and its wall_time in a shared memory map (it
    survives a SIGKILL: the page cache keeps it), then wait to be signalled."""
    with open(progress, "wb") as f:
        f.write(b"\0" * PROGRESS.size)
    with open(progress, "r+b") as f:
        mm = mmap.mmap(f.fileno(), PROGRESS.size)
    pid = os.getpid()
    with collector.start_run(db, name="signalled", batch_size=32, lr=0.1, finish_timeout=5) as run:
        t0 = time.perf_counter()
        clock = time.perf_counter
        for step in range(1, n_steps + 1):
            wall = clock() - t0
            run.log_step(step, examples=32 * step, loss=1.0 / step, lr=0.1, batch_size=32, wall_time=wall)
            PROGRESS.pack_into(mm, 0, step, 0, 0.0, wall, pid)
        PROGRESS.pack_into(mm, 0, n_steps, 1, n_steps / (time.perf_counter() - t0), wall, pid)
        time.sleep(120)  # killed here in the "right after the loop" cases


def read_progress(path: str) -> tuple[int, bool, float, float, int]:
    """(last step logged, loop finished, steps/s, the last step's wall_time, the writer's pid)."""
    with open(path, "rb") as f:
        step, done, rate, wall, pid = PROGRESS.unpack(f.read(PROGRESS.size))
    return step, bool(done), rate, wall, pid


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the fields after "(comm)": state, ppid, ...


def kill_descendant(pid: int, root: int, sig: int) -> None:
    """Send `sig` to `pid` only if it is `root` or a process below it: a pid read from a file (a progress
    map, a segment's name) that is wrong or reused must never reach the test runner or its CI."""
    p = pid
    for _ in range(8):
        if p == root:
            os.kill(pid, sig)
            return
        if p <= 1:
            break
        p = _parent(p)
    raise AssertionError(f"pid {pid} is not {root} or below it: not signalled")


def hold_store(db: str, seconds: float) -> None:
    """Hold the store open read-write with a plain DuckDB connection, as a forgotten shell would."""
    con = duckdb.connect(db)
    print("holding", flush=True)
    time.sleep(seconds)
    con.close()


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if role == "writer":
        writer(rest[0], rest[1], int(rest[2]))
    elif role == "reader":
        reader(rest[0], float(rest[1]))
    elif role == "slow_writer":
        slow_writer(rest[0], rest[1])
    elif role == "paced_writer":
        paced_writer(rest[0], rest[1], float(rest[2]), float(rest[3]))
    elif role == "plain_reader":
        plain_reader(rest[0], float(rest[1]))
    elif role == "signal_writer":
        signal_writer(rest[0], rest[1], int(rest[2]))
    elif role == "hold_store":
        hold_store(rest[0], float(rest[1]))
    elif role == "disk_full_writer":
        disk_full_writer(rest[0], rest[1], rest[2] == "free")
