"""Committed rows stay committed: the store lock, the end-of-run check, and replay of kept segments.

These guard against a loss seen under contention (docs/DESIGN.md, "Store lock"): DuckDB decides
whether a database file is new *before* it takes its file lock, so a process that found no file, then
waited for the CPU while another created and filled it, initialised it afresh over the other's data.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

import collector
from collector.ingest import ingest_spool, recover_spools
from collector.spool import INGESTED, Spool
from collector.store import (
    LOCK_FILE,
    StoreLockedError,
    read_connection,
    spool_root,
    try_write_connection,
    write_connection,
)
from tests.collector_workers import CREATE_AND_WRITE, start_held_in_create

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

def _count(db: Path, sql: str, params: list | None = None) -> int:
    with read_connection(db, timeout=30) as con:
        return con.execute(sql, params or []).fetchall()[0][0]


def _can_strace() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-qq", "-o", os.devnull, "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_strace(), reason="needs strace allowed to trace (apt-get install strace)")
def test_a_store_created_while_another_process_decides_it_is_new_keeps_both_commits(tmp_path):
    """The race, forced: B finds no file, then is held in its create-open (strace delays that syscall)
    while A starts. With plain duckdb.connect, A creates the store and commits, then B initialises the
    file afresh and A's row is gone (bench/stress_store.py forced). Through write_connection, A waits
    for B and both rows stay."""
    db = tmp_path / "runs.duckdb"
    trace = tmp_path / "strace.log"
    b = start_held_in_create(db, trace, [sys.executable, "-c", CREATE_AND_WRITE, str(db)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "ENOENT" in trace.read_text()  # B has decided the store is new and is now held
    a = subprocess.run([sys.executable, "-c", CREATE_AND_WRITE, str(db)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    assert b.wait(timeout=120) == 0, b.communicate()
    assert _count(db, "SELECT count(*) FROM scalars") == 2


def test_store_lock_excludes_writers_and_is_released_after_close(tmp_path):
    db = tmp_path / "runs.duckdb"
    with try_write_connection(db) as con:
        con.execute("SELECT 1")
    lock_path = spool_root(db) / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as a reader elsewhere would
        with try_write_connection(db) as con:
            assert con is None  # a writer must not open the file while a batchscope reader is in it
        with read_connection(db, timeout=0.2) as con:  # readers share
            assert con.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreLockedError, match=rf"locked by .*python.* \(PID {os.getpid()}\)"), \
                read_connection(db, timeout=0.2):
            pass
    finally:
        os.close(fd)
    with try_write_connection(db) as con:
        assert con is not None
        fd = os.open(lock_path, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again once the connection closed
    os.close(fd)


def test_finish_puts_back_rows_the_store_lost(tmp_path, capsys):
    """Rows deleted behind the run's back after their ingest come back from the kept segments."""
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db, name="victim", flush_every=0.05) as run:
        for step in range(1, 301):
            run.log_step(step, loss=1.0 / step)
            if step % 100 == 0:
                run.log_eval(step, split="test", loss=1.0, accuracy=0.5)
        run._spool_buffers()  # an ingest turn, as the background thread takes when one is due
        assert run._try_ingest()
        assert _count(db, "SELECT count(*) FROM steps") == 300
        run.log_step(301, loss=0.1)
        with write_connection(db) as con:  # as if another process had lost committed rows
            con.execute("DELETE FROM steps WHERE step <= 150")
            con.execute("DELETE FROM evals")
    err = capsys.readouterr().err
    assert "lacked rows" in err and "'steps': 150" in err and "'evals': 3" in err
    assert _count(db, "SELECT count(DISTINCT step) FROM steps WHERE run_id = ?", [run.run_id]) == 301
    assert _count(db, "SELECT count(*) FROM evals") == 3
    assert not run.spool.dir.exists()


def test_finish_check_accepts_a_step_logged_twice(tmp_path, capsys):
    """Duplicate keys are stored once by design: not a loss, no repair, spool removed."""
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db, name="dupes") as run:
        for step in (1, 2, 2, 3):
            run.log_step(step, loss=1.0)
    assert "lacked" not in capsys.readouterr().err
    assert _count(db, "SELECT count(*) FROM steps") == 3
    assert not run.spool.dir.exists()


def test_recovery_replays_kept_segments_of_a_dead_run(tmp_path):
    db = tmp_path / "runs.duckdb"
    spool = Spool(spool_root(db), "deadbeef0001", keep_ingested=True)
    spool.create_and_own()
    spool.write_run({"run_id": "deadbeef0001", "name": "dead", "status": "running"})
    spool.write_segment("steps", pa.table({"step": list(range(1, 101)), "loss": [0.5] * 100}))
    with try_write_connection(db) as con:
        ingest_spool(con, spool)
        con.execute("DELETE FROM steps WHERE step > 50")  # committed, then lost
    assert spool.segments() == [] and len(spool.segments(ingested=True)) == 1
    assert (spool.dir / INGESTED).is_dir()
    spool.release()  # the process "dies"
    assert recover_spools(db) == 1
    assert _count(db, "SELECT count(*) FROM steps") == 100
    assert _count(db, "SELECT status FROM runs") == "stale"
    assert not spool.dir.exists()


def test_kept_segments_past_the_limit_are_checked_then_dropped(tmp_path, capsys, monkeypatch):
    """keep_bytes bounds the spool: the oldest kept segments are looked up in the store and dropped only
    if every row is there; a segment with rows missing stays and is repaired at finish."""
    db = tmp_path / "runs.duckdb"
    # turns are driven by hand: a background one (it prunes too) could land between the steps below
    monkeypatch.setattr(collector.ingester, "due", lambda db: False)
    run = collector.start_run(db, name="long", flush_every=3600, keep_bytes=1)
    time.sleep(0.5)  # the first background tick (heartbeat) is done; flushes below are driven by hand
    for step in range(1, 101):
        run.log_step(step, loss=1.0)
    run._spool_buffers()
    assert run._try_ingest()
    assert run.spool.kept_bytes > 1
    run._prune_kept()
    assert run.spool.pruned and run.spool.segments(ingested=True) == [] and run.spool.kept_bytes == 0

    for step in range(101, 201):
        run.log_step(step, loss=1.0)
    run._spool_buffers()
    assert run._try_ingest()
    with write_connection(db) as con:  # rows of the kept segment go missing after their commit
        con.execute("DELETE FROM steps WHERE step > 150")
    run._prune_kept()
    assert len(run.spool.segments(ingested=True)) == 1  # not dropped: it is needed for the repair
    run.finish()
    assert "lacked rows" in capsys.readouterr().err
    assert _count(db, "SELECT count(DISTINCT step) FROM steps") == 200
    assert not run.spool.dir.exists()
