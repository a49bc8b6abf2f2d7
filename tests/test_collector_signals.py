"""The kill matrix: SIGTERM, SIGINT and SIGKILL at several points of a real training-like process.

SIGTERM and SIGINT lose nothing, end the run `failed` with the signal named, and the process exits as
it would have without batchscope (killed by SIGTERM: 143 in a shell; SIGINT: KeyboardInterrupt, 130).
SIGKILL loses at most about a second of steps: the spool thread writes a segment every 0.5 s whatever
the store is doing, and recovery brings the rest in as `stale`. "During ingest" kills the process while
it holds the ingest lease in the middle of a COMMIT (strace holds it in DuckDB's first fdatasync: new
blocks written, the header that switches to them not yet): the lease passes on, nothing committed
half-way is lost or stored twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from collector.ingester import Lease
from collector.store import spool_root, write_connection
from tests.collector_workers import kill_descendant, read_progress

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# a segment every 0.5 s plus the time to write it: ~1 s here; a loaded CI disk can stall one fsync
SIGKILL_BOUND_S = 2.5


def _spawn(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-m", "tests.collector_workers", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _ingest(db: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "collector", "ingest", "--db", str(db)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _schedule_turn(db: Path, delay: float) -> None:
    """Set the store's next ingest turn `delay` s from now (the schedule every ingester follows)."""
    lease = Lease(db)
    assert lease.acquire(10.0)
    lease.set_schedule(time.time() + delay, time.time())
    lease.release()


def _held_in_commit(trace: Path) -> bool:
    """Whether the writer entered its first fdatasync (strace holds it there): DuckDB's first of the two
    fsyncs of an ingest turn's COMMIT."""
    return trace.exists() and "fdatasync(" in trace.read_text()


# (signal, when): mid-loop, right after a fast loop, mid-loop while another process holds the store, or
# while the writer itself is inside an ingest turn's COMMIT. The mid-loop row runs by default; the rest
# take a few seconds each on 2 cores (slow, still in CI).
WHEN = ("mid-loop", "after-loop", "store-held", "during-ingest")
MATRIX = [pytest.param(sig, when, id=f"{sig}-{when}", marks=[] if when == "mid-loop" else [pytest.mark.slow])
          for sig in ("SIGTERM", "SIGINT", "SIGKILL") for when in WHEN
          if not (when == "during-ingest" and sig == "SIGINT")]  # SIGINT's path is SIGTERM's with a handler



def _stop(proc: subprocess.Popen, progress: Path) -> None:
    """Kill what is left of the writer after a failure (the writer first: under strace it is a child)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(Exception):
        kill_descendant(read_progress(str(progress))[4], proc.pid, signal.SIGKILL)
    proc.kill()
    proc.communicate()


@pytest.mark.parametrize(("signame", "when"), MATRIX)
def test_kill_matrix(tmp_path, signame, when):
    db, progress, trace = tmp_path / "runs.duckdb", tmp_path / "progress", tmp_path / "strace"
    sig = getattr(signal, signame)
    holder = None
    prefix: tuple[str, ...] = ()
    if when == "store-held":
        holder = _spawn("hold_store", str(db), "8")
        assert holder.stdout.readline().strip() == "holding"
    if when == "during-ingest":
        with write_connection(db):  # the store exists: the writer's own turns are its only fdatasyncs
            pass
        _schedule_turn(db, 600)  # no turn until the loop has spooled rows (below)
        hold_us = 5_000_000 if sig == signal.SIGKILL else 2_000_000  # the SIGKILL must land inside the hold
        prefix = ("strace", "-f", "-qq", "-o", str(trace), "-e", "trace=fdatasync",
                  "-e", f"inject=fdatasync:delay_enter={hold_us}:when=1")
    n_steps = 300_000 if when == "after-loop" else 20_000_000
    proc = _spawn("signal_writer", str(db), str(progress), str(n_steps), prefix=prefix)
    try:
        _wait_for(lambda: progress.exists() and progress.stat().st_size and read_progress(str(progress))[0] > 50_000
                  and any(spool_root(db).glob("*/**/*.arrow")), proc)  # the loop is running and spooling
        if when == "after-loop":
            _wait_for(lambda: read_progress(str(progress))[1], proc)
        elif when == "during-ingest":
            time.sleep(0.5)
            _schedule_turn(db, 0)  # due now: the writer's ingest thread takes it, with ~1 s of rows
            _wait_for(lambda: _held_in_commit(trace), proc)
        else:
            time.sleep(1.0)  # a couple of spool ticks into the loop
        kill_descendant(read_progress(str(progress))[4], proc.pid, sig)  # the writer (under strace, its child)
        out, err = proc.communicate(timeout=120)
    finally:  # a failed wait must not leave a 20M-step loop (or the holder) on a core for later tests
        _stop(proc, progress)
        if holder is not None:
            holder.kill()
            holder.wait()
    accepted, _, _, accepted_wall, _ = read_progress(str(progress))  # the last step the loop completed
    lease = Lease(db)
    lease_free = lease.acquire(0.0)  # the kernel dropped a killed holder's lease
    lease.release()
    if when == "during-ingest" and sig == signal.SIGKILL:  # its only COMMIT was cut short: none of it is there
        with duckdb.connect(str(db), read_only=True) as con:
            assert con.execute("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM steps)").fetchall() == [(0, 0)]
    summary = _ingest(db)  # whatever a killed run or a blocked finish left in the spool

    with duckdb.connect(str(db), read_only=True) as con:
        n, distinct, hi, wall = con.execute("SELECT count(*), count(DISTINCT step), max(step), max(wall_time) "
                                            "FROM steps").fetchall()[0]
        status, reason = con.execute("SELECT status, status_reason FROM runs").fetchall()[0]
    assert lease_free
    assert n == distinct == (hi or 0), "stored steps are 1..max, each once"
    lost_s = accepted_wall - (wall or 0.0)
    print(f"{signame} {when}: accepted {accepted:,}, stored {n:,} (lost {accepted - n:,} = {lost_s:.2f} s of the "
          f"loop), status {status} ({reason}), exit {proc.returncode}")
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert status == "stale" and "recovered 1 run spool" in summary, summary
        assert lost_s <= SIGKILL_BOUND_S, f"lost {accepted - n:,} steps, the last {lost_s:.2f} s of the loop"
    else:
        assert accepted <= n <= accepted + 1, (accepted, n)  # the signal may land between log_step and the mark
        assert (status, reason) == ("failed", signame)
        assert f"{signame}: ending run" in err or f"{signame}: run " in err
        expected = -signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGINT  # 143 / 130 in a shell
        assert proc.returncode == expected, (proc.returncode, err)
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in err  # the default SIGINT behaviour, chained to
    if when == "during-ingest":
        assert _held_in_commit(trace)  # it was held inside that COMMIT when signalled
    assert [p for p in spool_root(db).iterdir() if p.is_dir()] == []


def test_a_graceful_stop_handler_is_chained_and_the_last_rows_are_kept(tmp_path):
    """A program's own SIGTERM handler (stop the loop, log a last evaluation) still runs after ours;
    what it logs after the signal is stored, and the run ends failed with the signal named. An ignored
    SIGINT stays ignored. A KeyboardInterrupt caught by the loop works the same way."""
    db = tmp_path / "r.duckdb"
    code = f"""
import signal, sys, collector
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
signal.signal(signal.SIGINT, signal.SIG_IGN)
with collector.start_run({str(db)!r}, name="graceful") as run:
    signal.raise_signal(signal.SIGINT)  # ignored before us: still ignored
    step = 0
    while not stop:
        step += 1
        run.log_step(step, loss=1.0)
        if step == 1000:
            signal.raise_signal(signal.SIGTERM)
    run.log_eval(step, split="test", loss=0.5)  # the last evaluation, after the signal
print(step)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1000"] and res.stderr.count("\n") == 1 and "SIGTERM" in res.stderr, res.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM steps").fetchall() == [(1000,)]
        assert con.execute("SELECT count(*) FROM evals").fetchall() == [(1,)]
        assert con.execute("SELECT status, status_reason FROM runs").fetchall() == [("failed", "SIGTERM")]


def test_no_handlers_outside_the_main_thread(tmp_path):
    code = f"""
import signal, threading, collector
def start():
    collector.start_run({str(tmp_path / 'r.duckdb')!r}, name="thread").finish()
t = threading.Thread(target=start); t.start(); t.join()
print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr
