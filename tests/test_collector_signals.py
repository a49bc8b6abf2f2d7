"""The kill matrix: SIGTERM, SIGINT and SIGKILL at several points of a real training-like process.

SIGTERM and SIGINT lose nothing, end the run `failed` with the signal named, and the process exits as
it would have without batchscope (killed by SIGTERM: 143 in a shell; SIGINT: KeyboardInterrupt, 130).
SIGKILL loses at most about a second of steps: the spool thread writes every second whatever the store
is doing, and recovery brings the rest in as `stale`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from collector.store import spool_root
from tests.collector_workers import read_progress

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.collector_workers", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _ingest(db: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "collector", "ingest", "--db", str(db)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# (signal, when): mid-loop, right after a fast loop, or mid-loop while another process holds the store.
# The mid-loop row runs by default; the rest take a few seconds each on 2 cores (slow, still in CI).
MATRIX = [pytest.param(sig, when, id=f"{sig}-{when}", marks=[] if when == "mid-loop" else [pytest.mark.slow])
          for sig in ("SIGTERM", "SIGINT", "SIGKILL") for when in ("mid-loop", "after-loop", "store-held")]


@pytest.mark.parametrize(("signame", "when"), MATRIX)
def test_kill_matrix(tmp_path, signame, when):
    db, progress = tmp_path / "runs.duckdb", tmp_path / "progress"
    sig = getattr(signal, signame)
    holder = None
    if when == "store-held":
        holder = _spawn("hold_store", str(db), "12")
        assert holder.stdout.readline().strip() == "holding"
    n_steps = 600_000 if when == "after-loop" else 20_000_000
    proc = _spawn("signal_writer", str(db), str(progress), str(n_steps))
    _wait_for(lambda: progress.exists() and progress.stat().st_size and read_progress(str(progress))[0] > 100_000
              and any(spool_root(db).glob("*/**/*.arrow")), proc)  # the loop is running and spooling
    if when == "after-loop":
        _wait_for(lambda: read_progress(str(progress))[1], proc)
        rate = read_progress(str(progress))[2]
    else:
        s0, t0 = read_progress(str(progress))[0], time.monotonic()
        time.sleep(1.5)  # a few spool ticks into the loop
        rate = (read_progress(str(progress))[0] - s0) / (time.monotonic() - t0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    accepted = read_progress(str(progress))[0]  # the last step the loop completed before the signal
    if holder is not None:
        holder.kill()
        holder.wait()
    _ingest(db)  # whatever a killed run or a blocked finish left in the spool

    with duckdb.connect(str(db), read_only=True) as con:
        n, distinct, hi = con.execute("SELECT count(*), count(DISTINCT step), max(step) FROM steps").fetchall()[0]
        status, reason = con.execute("SELECT status, status_reason FROM runs").fetchall()[0]
    assert n == distinct == (hi or 0), "stored steps are 1..max, each once"
    print(f"{signame} {when}: accepted {accepted:,}, stored {n:,}, status {status} ({reason}), "
          f"rate {rate:,.0f} steps/s, exit {proc.returncode}")
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert status == "stale"
        # ~1 s by design (a segment every 0.5 s, plus the time to write it); 2 s leaves room for a loaded
        # 2-core machine, where turning a hot loop's rows into Arrow competes with the loop for the GIL.
        assert accepted - n <= 2.0 * rate, f"lost {accepted - n:,} steps, more than ~1 s at {rate:,.0f} steps/s"
    else:
        assert accepted <= n <= accepted + 1, (accepted, n)  # the signal may land between log_step and the mark
        assert (status, reason) == ("failed", signame)
        assert f"{signame}: ending run" in err or f"{signame}: run " in err
        expected = -signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGINT  # 143 / 130 in a shell
        assert proc.returncode == expected, (proc.returncode, err)
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in err  # the default SIGINT behaviour, chained to
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
