"""Remote logging, the receiving side: remote runs' run rows, spool segments and heartbeats, into the store's
spool. The HTTP routes that call it are collector/serve.py's (`python -m collector serve`, or embedded in
the dashboard by `install_receiver`). Nothing here opens
the store to write rows: a received segment is written, atomically, into the store's own spool
(`<db>.spool/<run_id>/`), exactly where a local writer would have put it, and the single ingester
(collector/ingester.py, the lease) moves it in with everyone else's. While a remote run's requests keep
arriving, this process holds the run's spool `owner.lock`, so ingest turns treat it as live; when they
stop for two heartbeats (the client's machine died, or the network did) the lock is let go and the next
turn recovers the spool as a dead one: `stale`, by the store's existing rule. A client that comes back
sends its run row again and goes on.

Idempotence: `<db>.spool/.remote/<run_id>.json` (a dot folder: ingest turns skip it) keeps, per
client process, the highest segment sequence received. A segment already received (its ack was
lost), whether still in the spool, ingested, or recovered with a dead spool, is acknowledged again
and not written twice; should the ledger lag a crash, the store's primary keys still refuse a replay.

Bad input is a 4xx with a one-line JSON `error`, never a 5xx: a body over the limit (413), a name
that is not a segment's (400), a segment that is not readable Arrow or has columns its table lacks
(400, and its bytes are quarantined as local corrupt segments are). 503 means busy: retry.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from collector import ingester
from collector.ingest import RUN_COLUMNS, SEGMENT_COLUMNS, ingest_spool, missing_rows, upsert_run
from collector.spool import QUARANTINE, TABLES, Spool, atomic_write
from collector.store import StoreError, read_connection, spool_root, try_write_connection

MAX_SEGMENT_BYTES = 64 * 2**20  # a client's segment holds ~0.5 s of rows: a few MB at most
MAX_JSON_BYTES = 2**20
LEDGER = ".remote"
RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SEGMENT = re.compile(r"^(\d{1,10})-(\d{1,12})\.(steps|evals|scalars)\.arrow$")
KEY_COLUMNS = {"steps": {"step"}, "evals": {"step", "split"}, "scalars": {"step", "name"}}  # the primary keys
STATUSES = ("running", "finished", "diverged", "failed", "stale")
MIN_HEARTBEAT_S, MAX_HEARTBEAT_S = 0.2, 300.0
GRACE_S = 2.0  # beyond two heartbeats, before a silent run's spool is let go
FINISH_WAIT_S = 60.0  # how long a finish waits for the ingest lease and the store


class Receiver:
    """The remote runs of one store, as seen by this server process."""

    def __init__(self, db: Path):
        self.db = Path(db)
        self.root = spool_root(self.db)
        self._lock = threading.Lock()
        self._run_locks: dict[str, threading.Lock] = {}
        self._owned: dict[str, tuple[Spool, float]] = {}  # run_id -> (spool we own, let go after)
        self._thread: threading.Thread | None = None
        self._recover = False  # runs were let go: take an ingest turn as soon as the lease is free
        self._finishing: dict[str, tuple[Spool, dict]] = {}  # run_id -> (spool, final row): ends to store
        self._wake = threading.Event()

    # --- ownership -------------------------------------------------------------------------------
    def _run_lock(self, run_id: str) -> threading.Lock:
        with self._lock:
            return self._run_locks.setdefault(run_id, threading.Lock())

    def _own(self, run_id: str, heartbeat_s: float) -> Spool | None:
        """Own the run's spool here (creating it) until two heartbeats from now; None if another process
        holds it (an ingest turn recovering it right now)."""
        expires = time.monotonic() + 2 * heartbeat_s + GRACE_S
        with self._lock:
            if run_id in self._owned:
                spool, _ = self._owned[run_id]
                if spool.dir.is_dir():
                    self._owned[run_id] = (spool, expires)
                    return spool
                spool.release()
                del self._owned[run_id]
        spool = Spool(self.root, run_id, keep_ingested=True)
        spool.dir.mkdir(parents=True, exist_ok=True)
        if not spool.try_own():
            return None
        with self._lock:
            self._owned[run_id] = (spool, expires)
        self._start()
        return spool

    def _release(self, run_id: str) -> None:
        with self._lock:
            spool, _ = self._owned.pop(run_id, (None, 0.0))
        if spool is not None:
            spool.release()

    def adopt(self) -> int:
        """At start: own again the spools of remote runs that were live when this server last stopped,
        so that a restart does not make them stale (their clients resume within a heartbeat)."""
        n = 0
        for path in sorted((self.root / LEDGER).glob("*.json")) if (self.root / LEDGER).is_dir() else []:
            ledger = _read_json(path)
            run_id = path.stem
            if not ledger.get("finished") and (self.root / run_id).is_dir():
                n += self._own(run_id, float(ledger.get("heartbeat_s") or MIN_HEARTBEAT_S)) is not None
        return n

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="batchscope-receiver", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        """Let go of silent runs (the next ingest turn makes them stale), store the runs that asked to
        end, and take ingest turns when due, while this process has remote runs."""
        while True:
            self._wake.wait(0.25)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                silent = [r for r, (_, exp) in self._owned.items() if exp < now and r not in self._finishing]
                busy = bool(self._owned)
            for run_id in silent:  # under the run's lock: no segment is being written into it meanwhile
                lock = self._run_lock(run_id)
                if lock.acquire(blocking=False):
                    try:
                        _, exp = self._owned.get(run_id, (None, 0.0))
                        if exp < time.monotonic():
                            self._release(run_id)
                            self._recover = True
                    finally:
                        lock.release()
            if not (busy or self._recover):
                continue
            try:
                if self._finishing or self._recover or ingester.due(self.db):
                    lease = ingester.Lease(self.db)
                    if lease.acquire(0.0):
                        try:
                            self._turn(lease)
                        finally:
                            lease.release()
            except Exception as exc:  # noqa: BLE001 - the receiver goes on; the spool keeps the rows
                _note(f"batchscope serve: ingest into {self.db} failed ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:200]}); retrying")

    def _turn(self, lease: ingester.Lease) -> None:
        """One ingest turn of every spool (the ending runs' final rows are in their run.json), then the
        ending runs read back in one read-only connection; a shortfall is re-ingested once from the kept
        segments, and what is still missing fails the run, with the reason. Runs that end together
        thus cost one turn, not one each."""
        with self._lock:
            ending = dict(self._finishing)
        summary = ingester.ingest_locked(self.db, lease)
        self._recover = False
        if summary.busy or not ending:
            return
        missing = self._missing(ending)
        short = {r: m for r, m in missing.items() if m}
        if short:
            with try_write_connection(self.db) as con:
                if con is not None:
                    for run_id in short:
                        spool, row = ending[run_id]
                        ingest_spool(con, spool, replay_ingested=True)
                        upsert_run(con, row)
            missing |= self._missing({r: ending[r] for r in short})
        for run_id, gap in missing.items():
            spool, row = ending[run_id]
            gap = {t: n for t, n in gap.items() if t != "runs"}
            if gap:
                row = row | {"status": "failed", "status_reason": "; ".join(filter(None, [
                    row.get("status_reason"), f"{gap} rows never reached the server's store"]))}
                with try_write_connection(self.db) as con:
                    if con is None:
                        continue  # the store is busy: the next turn tries again
                    upsert_run(con, row)
            with self._run_lock(run_id):
                spool.remove()
                self._release(run_id)
                self._save_ledger(run_id, self._ledger(run_id) | {"finished": True, "status": row["status"],
                                                                  "missing": gap})
                with self._lock:
                    self._finishing.pop(run_id, None)

    def _missing(self, ending: dict[str, tuple[Spool, dict]]) -> dict[str, dict]:
        """Per ending run, what the store lacks of it (missing_rows); runs that could not be read are left
        out (the next turn tries again)."""
        out = {}
        try:
            with read_connection(self.db, timeout=FINISH_WAIT_S) as con:
                for run_id, (spool, row) in ending.items():
                    out[run_id] = missing_rows(con, spool, row["status"])
        except StoreError:
            pass
        return out

    # --- ledger ----------------------------------------------------------------------------------
    def _ledger_path(self, run_id: str) -> Path:
        return self.root / LEDGER / f"{run_id}.json"

    def _ledger(self, run_id: str) -> dict:
        return _read_json(self._ledger_path(run_id))

    def _save_ledger(self, run_id: str, ledger: dict) -> None:
        path = self._ledger_path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(ledger).encode())

    # --- requests: (HTTP status, JSON answer) ------------------------------------------------------
    def accept_run(self, run_id: str, body: bytes) -> tuple[int, dict]:
        """The run row (start, change, heartbeat)."""
        err = _check_run_id(run_id)
        if err:
            return err
        parsed = _run_body(run_id, body)
        if isinstance(parsed[0], int):
            return parsed  # type: ignore[return-value]
        row, heartbeat_s = parsed
        with self._run_lock(run_id):
            ledger = self._ledger(run_id)
            if ledger.get("finished"):
                return 200, {"ok": True, "finished": True}
            spool = self._own(run_id, heartbeat_s)
            if spool is None:
                return 503, {"error": "the run's spool is being recovered right now; retry"}
            old = _read_json(spool.dir / "run.json")
            if old != row:
                spool.write_run(row)
            if ledger.get("heartbeat_s") != heartbeat_s:
                self._save_ledger(run_id, ledger | {"heartbeat_s": heartbeat_s})
        return 200, {"ok": True}

    def accept_segment(self, run_id: str, name: str, body: bytes) -> tuple[int, dict]:
        """One sealed spool segment, as the client wrote it."""
        err = _check_run_id(run_id)
        if err:
            return err
        m = SEGMENT.match(name)
        if not m:
            return 400, {"error": f"{name[:80]!r} is not a segment name (<pid>-<seq>.<steps|evals|scalars>.arrow)"}
        pid, seq, table = m.group(1), int(m.group(2)), m.group(3)
        with self._run_lock(run_id):
            ledger = self._ledger(run_id)
            spool_dir = self.root / run_id
            if seq <= ledger.get("seq", {}).get(pid, 0) or (spool_dir / name).exists() \
                    or (spool_dir / "ingested" / name).exists():
                self._touch(run_id)
                return 200, {"ok": True, "known": True}
            if ledger.get("finished"):
                return 409, {"error": f"run {run_id} has finished; {name} came after its end"}
            why = _segment_problem(table, body)
            if why:
                dest = self._quarantine(run_id, name, body, why)
                return 400, {"error": f"segment {name} refused: {why}; kept aside as {dest}"}
            with self._lock:
                owned = self._owned.get(run_id)
            if owned is None or not (spool_dir / "run.json").exists():
                return 409, {"error": f"send run {run_id}'s row first", "need_run": True}
            self._touch(run_id)
            atomic_write(spool_dir / name, body)
            self._save_ledger(run_id, ledger | {"seq": ledger.get("seq", {}) | {pid: seq}})
        return 200, {"ok": True, "known": False}

    def _touch(self, run_id: str) -> None:
        """Any request of a live run counts as its heartbeat."""
        with self._lock:
            if run_id in self._owned:
                spool, _ = self._owned[run_id]
                hb = float(self._ledger(run_id).get("heartbeat_s") or MIN_HEARTBEAT_S)
                self._owned[run_id] = (spool, time.monotonic() + 2 * hb + GRACE_S)

    def finish(self, run_id: str, body: bytes) -> tuple[int, dict]:
        """The run's end: its final row and how many rows it wrote to segments (all of them shipped by
        now). 202 while the receiver's next turn stores and reads it back (the client asks again), then
        200 with the final status and anything missing; the spool goes once the store has it all."""
        err = _check_run_id(run_id)
        if err:
            return err
        try:
            payload = json.loads(body)
            written = {t: int(payload["written"].get(t, 0)) for t in TABLES}
        except (ValueError, TypeError, KeyError, AttributeError):
            return 400, {"error": "finish needs JSON {\"run\": {...}, \"written\": {\"steps\": n, ...}}"}
        parsed = _run_body(run_id, body)
        if isinstance(parsed[0], int):
            return parsed  # type: ignore[return-value]
        row, _ = parsed
        with self._run_lock(run_id):
            ledger = self._ledger(run_id)
            if ledger.get("finished"):
                return 200, {"stored": True, "status": ledger.get("status"), "missing": ledger.get("missing", {})}
            with self._lock:
                if run_id in self._finishing:
                    return 202, {"pending": True}
            spool = self._own(run_id, FINISH_WAIT_S)
            if spool is None:
                return 503, {"error": "the run's spool is being recovered right now; retry"}
            spool.write_run(row)
            spool.rows_written = written
            with self._lock:
                self._finishing[run_id] = (spool, row)
        self._wake.set()
        return 202, {"pending": True}

    def _quarantine(self, run_id: str, name: str, body: bytes, why: str) -> Path:
        dest_dir = self.root / QUARANTINE / run_id
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / name
        n = 1
        while dest.exists():
            n += 1
            dest = dest_dir / f"{name}.{n}"
        atomic_write(dest, body)
        _note(f"batchscope serve: quarantined segment {name} of run {run_id} -> {dest} ({why}); refused with 400")
        return dest


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _check_run_id(run_id: str) -> tuple[int, dict] | None:
    if not RUN_ID.match(run_id):
        return 400, {"error": f"{run_id[:80]!r} is not a run id (letters, digits, _ and -, at most 64)"}
    return None


def _run_body(run_id: str, body: bytes) -> tuple[dict, float] | tuple[int, dict]:
    """(run row, heartbeat_s) from a JSON body, or (status, error)."""
    try:
        payload = json.loads(body)
        row = payload["run"]
        heartbeat_s = float(payload.get("heartbeat_s") or MIN_HEARTBEAT_S)
    except (ValueError, TypeError, KeyError, AttributeError):
        return 400, {"error": "expected JSON {\"run\": {...run row...}, \"heartbeat_s\": seconds}"}
    if not isinstance(row, dict):
        return 400, {"error": "\"run\" must be an object (the runs row)"}
    unknown = set(row) - set(RUN_COLUMNS) - {"heartbeat_at"}
    if unknown:
        return 400, {"error": f"unknown run fields {sorted(unknown)[:10]}"}
    if row.get("status") not in STATUSES:
        return 400, {"error": f"status must be one of {', '.join(STATUSES)}"}
    if not isinstance(row.get("name"), str) or not row["name"]:
        return 400, {"error": "the run row needs a name"}
    if row.get("run_id", run_id) != run_id:
        return 400, {"error": "the row's run_id is not the URL's"}
    return row | {"run_id": run_id}, min(MAX_HEARTBEAT_S, max(MIN_HEARTBEAT_S, heartbeat_s))


def _segment_problem(table: str, body: bytes) -> str | None:
    """Why these bytes are not a segment of `table` (None if they are one)."""
    try:
        data = ipc.open_file(pa.py_buffer(body)).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"not a readable Arrow file: {' '.join(str(exc).split())[:160]}"
    columns = set(data.column_names) - {"run_id"}
    unknown = columns - SEGMENT_COLUMNS[table]
    if unknown:
        return f"columns {sorted(unknown)[:10]} are not in {table}"
    lacking = KEY_COLUMNS[table] - columns
    if lacking:
        return f"no {', '.join(sorted(lacking))} column"
    return None
