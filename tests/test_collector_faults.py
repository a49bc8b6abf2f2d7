"""Corrupt spool files are quarantined with one line each and everything else is recovered; a full disk
is said once with its real cause, rows wait in memory, and nothing is lost when space returns."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import collector
from collector.spool import QUARANTINE, Spool
from collector.store import spool_root

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _rows(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def _dead_spool(db: Path, run_id: str, n_steps: int, segments: int = 1, status: str = "running") -> Spool:
    spool = Spool(spool_root(db), run_id)
    spool.create_and_own()
    spool.write_run({"run_id": run_id, "name": f"run-{run_id}", "status": status})
    per = n_steps // segments
    for k in range(segments):
        steps = list(range(k * per + 1, (k + 1) * per + 1))
        spool.write_segment("steps", pa.table({"step": steps, "loss": [0.5] * per}))
    spool.release()  # its process "died"
    return spool


def _ingest_cli(db: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", "ingest", "--db", str(db)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_corrupt_segments_and_run_json_are_quarantined_and_the_rest_recovered(tmp_path):
    db = tmp_path / "runs.duckdb"
    # Sorted names: the broken spools come first, as in the report where they blocked every later one.
    truncated = _dead_spool(db, "00000000000a", 100, segments=2)
    garbled = _dead_spool(db, "00000000000b", 100, segments=2)
    empty = _dead_spool(db, "00000000000c", 100, segments=2)
    bad_json = _dead_spool(db, "00000000000d", 100)
    healthy = [_dead_spool(db, f"ffffffff000{i}", 300, segments=3) for i in range(3)]
    seg = truncated.segments()[0].path
    seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    seg = garbled.segments()[1].path
    data = bytearray(seg.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
    seg.write_bytes(bytes(data))
    empty.segments()[0].path.write_bytes(b"")
    (bad_json.dir / "run.json").write_bytes(b'{"run_id": "00000000000d", "name": ')

    res = _ingest_cli(db)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("batchscope: quarantined ") for line in lines), lines
    for name in ("00000000000a", "00000000000b", "00000000000c", "run.json"):
        assert sum(name in line for line in lines) >= 1
    assert "recovered 7 run spool(s)" in res.stdout and "quarantined 4 file(s)" in res.stdout, res.stdout

    counts = dict(_rows(db, "SELECT run_id, count(*) FROM steps GROUP BY run_id"))
    assert {s.run_id: counts.get(s.run_id) for s in healthy} == {s.run_id: 300 for s in healthy}
    assert counts["00000000000a"] == counts["00000000000b"] == counts["00000000000c"] == 50  # the good segment
    assert counts["00000000000d"] == 100  # rows of the spool whose run.json was garbled, under a placeholder
    assert _rows(db, "SELECT name, status FROM runs WHERE run_id = '00000000000d'") == [
        ("recovered 00000000000d", "stale")]
    quarantined = sorted(p.name for p in (spool_root(db) / QUARANTINE).rglob("*") if p.is_file())
    assert len(quarantined) == 4 and "run.json" in quarantined
    assert [p.name for p in spool_root(db).iterdir() if p.is_dir()] == [QUARANTINE]  # every spool recovered

    again = _ingest_cli(db)  # nothing left, nothing new to say
    assert again.returncode == 0 and again.stderr == "" and "recovered 0" in again.stdout


def test_a_live_run_with_a_corrupt_segment_reports_the_rows_it_lost(tmp_path, capsys):
    """The run's own segment is damaged on disk before ingest: it is quarantined, the run ends failed
    with the count of rows that are not in the store, never `finished` silently."""
    db = tmp_path / "runs.duckdb"
    run = collector.start_run(db, name="damaged", flush_every=3600)
    for step in range(1, 101):
        run.log_step(step, loss=1.0)
    run._spool_buffers()
    run.spool.segments()[0].path.write_bytes(b"garbage")
    for step in range(101, 151):
        run.log_step(step, loss=1.0)
    run.finish()
    err = capsys.readouterr().err
    assert "quarantined" in err and "100 of 150 logged steps are not in the store" in err, err
    assert _rows(db, "SELECT count(*) FROM steps") == [(50,)]
    status, reason = _rows(db, "SELECT status, status_reason FROM runs")[0]
    assert status == "failed" and "100 of 150 logged steps" in reason
    assert not run.spool.dir.exists()  # everything readable is stored; the damaged file is in quarantine/


def _can_mount_tmpfs(tmp: Path) -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs"
    probe = tmp / f"probe-{uuid.uuid4().hex[:6]}"
    probe.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True, text=True)
    if res.returncode != 0:
        return f"mount -t tmpfs is not permitted here: {res.stderr.strip()}"
    subprocess.run(["umount", str(probe)], check=True)
    return None


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a disk that really fills (ENOSPC for DuckDB's WAL and for the spool alike)."""
    why = _can_mount_tmpfs(tmp_path)
    if why:
        pytest.skip(why)
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("free", [True, False], ids=["freed-mid-run", "full-to-the-end"])
def test_disk_full_is_said_once_and_nothing_accepted_is_lost_silently(small_disk, free):
    db, filler = small_disk / "runs.duckdb", small_disk / "filler"
    res = subprocess.run([sys.executable, "-m", "tests.collector_workers", "disk_full_writer", str(db), str(filler),
                          "free" if free else "full"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    run_id, logged = res.stdout.split()
    logged = int(logged)
    err = res.stderr
    assert "No space left on device" in err and "cannot rollback" not in err, err
    assert err.count("cannot write to the spool") == 1, err  # said once
    if not free:
        filler.unlink()  # only to be able to read what the run left
    leftovers = [p for p in spool_root(db).rglob("*.tmp")]
    assert leftovers == [], leftovers
    if free:
        assert "writes its spool again" in err, err
        assert _rows(db, f"SELECT count(*), count(DISTINCT step), max(step) FROM steps WHERE run_id = '{run_id}'") == [
            (logged, logged, logged)]
        assert _rows(db, f"SELECT status, status_reason FROM runs WHERE run_id = '{run_id}'") == [("finished", None)]
        assert not (spool_root(db) / run_id).exists()
        return
    # Full to the end: the run says exactly how many accepted rows it could not keep, and why.
    stderr_lost = [line for line in err.splitlines() if " lost " in line]
    assert len(stderr_lost) == 1 and "No space left on device" in stderr_lost[0], err
    lost = int(stderr_lost[0].split(" lost ")[1].split(" of ")[0].replace(",", ""))
    assert 0 < lost <= 30000
    # What was spooled before the disk filled is stored now or recovered by the next ingest.
    time.sleep(0.1)
    res = _ingest_cli(db)
    assert res.returncode == 0, res.stderr
    stored = _rows(db, f"SELECT count(*) FROM steps WHERE run_id = '{run_id}'")[0][0]
    assert stored + lost == logged, (stored, lost, logged)
