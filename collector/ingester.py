"""One ingester at a time: whoever holds the ingest lease moves every spool of a store into DuckDB.

Without it, each writer opened the store about once a second, so with 8 trainers the file was almost
always open read-write and an analyst's plain `duckdb.connect(db, read_only=True)` was refused in 70 %
of tries. Now every writer still spools on its own (durable within ~1 s), but the store is opened by one
process per ingest for all runs at once, and ingests are spaced so that the store stays free most of
the time: at least `INGEST_EVERY` s apart, and `held / DUTY` apart after an ingest that held the store
for `held` s.

The lease is an flock on <db>.spool/ingest.lock, held only for one ingest; the kernel drops it when its
holder dies, so it passes on by itself. The file also holds the schedule (when the next ingest is due,
when the last one ended), so processes take turns instead of each ingesting every second.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from collector.ingest import Job, ingest_jobs, prepare
from collector.spool import QUARANTINE, RUN_FILE, Spool, quarantine
from collector.store import StoreError, spool_root, try_ingest_connection

LEASE_FILE = "ingest.lock"
_TRACE = bool(os.environ.get("BATCHSCOPE_TRACE_INGEST"))  # one stderr line per ingest turn (bench/stress_store.py)
INGEST_EVERY = 1.0  # seconds between two ingests, whichever processes do them
DUTY = 0.01  # an ingest that held the store for t s is followed by at least t / DUTY s of free store
MAX_GAP = 30.0  # ... but never more than this between ingests (so also how far a live page can lag the spools)
# A shorter cap for tests that watch a live page (tests/test_dashboard_browser.py); users keep 30 s.
MAX_GAP = float(os.environ.get("BATCHSCOPE_INGEST_MAX_GAP") or MAX_GAP)
HEARTBEAT_EVERY = 10.0  # live runs' heartbeat_at is refreshed at least this often, even with nothing new
STORE_PATIENCE = 2.0  # seconds an ingest retries a store that a reader (or a DuckDB shell) holds
# Errors of the store or the disk, not of one spool: they end the pass (and are reported by the caller).
STORE_ERRORS = (StoreError, OSError, duckdb.IOException, duckdb.FatalException, duckdb.InternalException)


@dataclass
class Summary:
    """What one pass over the spools did."""

    recovered: int = 0  # spools of dead processes moved in and removed
    live_ids: set[str] = field(default_factory=set)  # live runs whose spools were moved in (they keep spooling)
    rows: int = 0
    quarantined: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<run_id>: why"
    busy: bool = False  # the store stayed locked by another process

    @property
    def live(self) -> int:
        return len(self.live_ids)

    def line(self, db: Path) -> str:
        parts = [f"recovered {self.recovered} run spool(s) into {db}", f"moved {self.rows:,} rows",
                 f"{self.live} live run(s)", f"quarantined {len(self.quarantined)} file(s)",
                 f"skipped {len(self.skipped)}"]
        return ", ".join(parts) + (" (store busy: try again)" if self.busy else "")


class Lease:
    """The ingest lease of one store: an flock on <db>.spool/ingest.lock plus the shared schedule."""

    def __init__(self, db: Path):
        self.path = spool_root(db) / LEASE_FILE
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lease, waiting up to `wait` s; False if another process kept it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.005 + 0.02 * random.random())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def held(self, wait: float = 0.0) -> Iterator[bool]:
        got = self.acquire(wait)
        try:
            yield got
        finally:
            if got:
                self.release()

    def schedule(self) -> tuple[float, float]:
        """(when the next ingest is due, when the last one ended), as Unix times; (0, 0) if unknown."""
        try:
            with open(self.path, "rb") as f:
                due, last = f.read(64).split()
            return float(due), float(last)
        except (OSError, ValueError):
            return 0.0, 0.0

    def set_schedule(self, due: float, last: float) -> None:
        assert self._fd is not None, "only the lease holder sets the schedule"
        data = f"{due:.3f} {last:.3f}\n".encode()
        os.pwrite(self._fd, data.ljust(40), 0)


def _spool_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != QUARANTINE and not p.name.startswith("."))


def due(db: Path) -> bool:
    """Whether an ingest is due now: its time has come and there is something to move (or heartbeats
    to refresh). Cheap: a read of the lease file and a listing of the spool folders."""
    next_due, last = Lease(db).schedule()
    now = time.time()
    if now < next_due:
        return False
    if now - last >= HEARTBEAT_EVERY:
        return True
    for d in _spool_dirs(spool_root(db)):
        if any(d.glob("*.arrow")):
            return True
        with contextlib.suppress(OSError):
            if (d / RUN_FILE).stat().st_mtime > last:
                return True
    return False


def ingest_all(db: Path, wait: float = 0.0, patience: float = STORE_PATIENCE) -> Summary | None:
    """With the lease (waiting up to `wait` s), move every run's spool into the store; None if another
    process holds the lease. Raises StoreError (corrupt store, ...) and I/O errors (a full disk)."""
    if not spool_root(db).is_dir():
        return Summary()  # no writer ever spooled here: nothing to do, and nothing to create
    lease = Lease(db)
    if not lease.acquire(wait):
        return None
    try:
        return ingest_locked(db, lease, patience)
    finally:
        lease.release()


def ingest_locked(db: Path, lease: Lease, patience: float = STORE_PATIENCE,
                  then: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
                  on_busy: Callable[[], None] | None = None) -> Summary:
    """One pass over every spool, by the lease holder, in one store connection (one transaction per
    round); sets the schedule. Runs that ended while a round ran (their run.json was rewritten) get up
    to two more rounds in the same connection, so runs ending together rarely need a turn each.
    `then(con)` runs last in the same connection (a finishing run's final row); `on_busy()` is called at
    each try that finds the store locked by another process."""
    summary = Summary()
    start = time.time()
    held = 0.0
    owned: list[Spool] = []  # dead spools whose owner lock we took: released at the end
    try:
        jobs = _jobs(db, summary, owned, since=None)
        if not jobs and then is None:
            return summary
        opened: list[float] = []
        with _patient_connection(db, patience, on_busy, opened) as con:
            if con is None:
                summary.busy = True
                return summary
            held_from = opened[0]  # the store is held from the open that succeeded
            for round_ in range(3):
                round_start = time.time()
                _ingest_round(con, jobs, summary, {s.run_id for s in owned})
                if round_ == 2:
                    break
                jobs = _jobs(db, summary, owned, since=round_start)
                if not jobs:
                    break
            if then is not None:
                then(con)
        held = time.monotonic() - held_from  # includes the close (DuckDB's checkpoint)
    finally:
        for spool in owned:
            spool.release()
        now = time.time()
        gap = INGEST_EVERY if summary.busy else min(MAX_GAP, max(INGEST_EVERY, held / DUTY))
        lease.set_schedule(now + gap - (now - start if not summary.busy else 0.0), now)
        if _TRACE:
            print(f"ingest-trace pid={os.getpid()} t={now:.3f} held={held:.3f} gap={gap:.2f} rows={summary.rows} "
                  f"live={summary.live} recovered={summary.recovered} busy={summary.busy}", file=sys.stderr, flush=True)
    return summary


def _jobs(db: Path, summary: Summary, owned: list[Spool], since: float | None) -> list[Job]:
    """The spools to ingest: all of them (since=None), or the live ones whose run.json was rewritten after
    `since` (their run ended). Dead spools are owned (appended to `owned`) until the turn ends."""
    jobs = []
    for run_dir in _spool_dirs(spool_root(db)):
        if since is not None and _mtime(run_dir / RUN_FILE) <= since:
            continue  # later rounds: only runs that ended (rewrote run.json) meanwhile; new rows can wait
        spool = Spool(run_dir.parent, run_dir.name, keep_ingested=True)
        dead = since is None and spool.try_own()
        if dead:
            owned.append(spool)
        try:
            job = _prepare(spool, summary, dead)
        except Exception as exc:  # noqa: BLE001 - one bad spool must not keep the others out
            summary.skipped.append(f"{spool.run_id}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        if job is not None:
            jobs.append(job)
    return jobs


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _ingest_round(con: duckdb.DuckDBPyConnection, jobs: list[Job], summary: Summary, dead: set[str]) -> None:
    """Move the jobs in (one transaction; one per spool if that fails for a reason not the store's)."""
    try:
        summary.rows += ingest_jobs(con, jobs, summary.quarantined)
    except STORE_ERRORS:
        raise
    except Exception:  # noqa: BLE001 - not the store's fault: find the spool, skip it, go on
        for job in list(jobs):
            try:
                summary.rows += ingest_jobs(con, [job], summary.quarantined)
            except STORE_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001
                summary.skipped.append(f"{job.spool.run_id}: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())[:200]}")
                jobs.remove(job)
    for job in jobs:
        if job.spool.run_id in dead:
            job.spool.remove_temp_files()
            job.spool.remove()
            summary.recovered += 1
        else:
            summary.live_ids.add(job.spool.run_id)


def _prepare(spool: Spool, summary: Summary, dead: bool) -> Job | None:
    run = _read_run(spool, summary, dead)
    if run is None:
        return None
    override = "stale" if dead and run.get("status") == "running" else None
    return prepare(spool, status_override=override, replay_ingested=dead, alive=not dead,
                   quarantined=summary.quarantined)


def _read_run(spool: Spool, summary: Summary, dead: bool) -> dict | None:
    """The spool's run row, or None to leave the spool alone this time. A garbled run.json is
    quarantined; a dead run's rows then go in under a placeholder row (status stale) rather than stay
    in the spool forever."""
    try:
        run = spool.read_run()
    except ValueError as exc:
        consequence = ("its rows go in under a placeholder run row (status stale)" if dead
                       else "its live owner rewrites it when the run ends")
        summary.quarantined.append(str(quarantine(spool.dir.parent, spool.dir / RUN_FILE, str(exc),
                                                  consequence=consequence)))
        if not dead:
            summary.skipped.append(f"{spool.run_id}: run.json unreadable, its owner is alive")
            return None
        placeholder = {"run_id": spool.run_id, "name": f"recovered {spool.run_id}", "status": "stale",
                       "status_reason": "its run.json was unreadable (quarantined): run fields unknown"}
        spool.write_run(placeholder)
        return placeholder
    if run is None:
        if dead and not spool.segments() and not spool.segments(ingested=True):
            spool.remove_temp_files()
            spool.remove()  # a writer that died before writing anything
        else:
            summary.skipped.append(f"{spool.run_id}: no run.json yet")
        return None
    return run


@contextlib.contextmanager
def _patient_connection(db: Path, patience: float, on_busy: Callable[[], None] | None = None,
                        opened: list[float] | None = None):
    """try_ingest_connection, retried with jitter for up to `patience` s; yields None if still busy.
    `opened` gets the monotonic time at which the successful open began."""
    deadline = time.monotonic() + patience
    while True:
        if opened is not None:
            opened[:] = [time.monotonic()]
        with try_ingest_connection(db) as con:
            if con is not None:
                yield con
                return
        if on_busy is not None:
            on_busy()
        if time.monotonic() >= deadline:
            yield None
            return
        time.sleep(0.005 + 0.025 * random.random())
