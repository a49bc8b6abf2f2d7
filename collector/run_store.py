"""A run's side of the store: its turns as the store's ingester, the end-of-run check, and repairs.

Mixed into Run (collector/run.py), which owns the buffers, the spool and the logging calls. Every
method here may wait on the store; none is ever called from the training loop's thread except at
finish().
"""

from __future__ import annotations

import random
import sys
import time

import duckdb

from collector import ingester
from collector.ingest import ingest_spool, missing_keys, missing_rows, read_segments, upsert_run
from collector.store import StoreError, read_connection, try_ingest_connection

TICK_PATIENCE = ingester.STORE_PATIENCE  # seconds a background ingest keeps retrying a locked store


class RunStore:
    """Store-side methods of Run (see there for the attributes they use)."""

    def _store_final(self) -> bool:
        """Under the ingest lease: a full ingest turn (this run's spool and everyone else's, in one
        connection, with this run's final row), then the read-back check in a read-only connection, so
        that a sweep's runs ending together open the store read-write once each."""
        lease = ingester.Lease(self.db)
        with lease.held(self.finish_timeout) as got:
            if not got:
                self._say("lease", f"batchscope: another process kept the ingest lease of {self.db} for "
                          f"{self.finish_timeout:.0f} s")
                return False
            if not self._spool_error() and self._check_store(repair=False, wait=0.2) == {}:
                return True  # another run's ingest turn already stored all of it (runs of a sweep ending together)
            try:  # the final row goes in even if run.json could not be rewritten (a full disk)
                summary = ingester.ingest_locked(self.db, lease, self.finish_timeout,
                                                 then=lambda con: upsert_run(con, self._row),
                                                 on_busy=lambda: self._note_busy(True))
                self._note_busy(summary.busy)
            except StoreError as exc:
                self._say("store", f"batchscope: {exc}; run {self.run_id} keeps its spool {self.spool.dir}")
                return False
            except Exception as exc:  # noqa: BLE001 - say the real cause once; the spool keeps the rows
                self._say("ingest", f"batchscope: writing to {self.db} failed ({_one_line(exc)}); rows stay in "
                          f"{self.spool.dir}")
                return False
            if summary.busy:
                self._say("locked", f"batchscope: store {self.db} stayed busy (locked by another process) for "
                          f"{self.finish_timeout:.0f} s")
                return False
            missing = self._check_store()
            if missing is None:
                return False
            if missing:  # not in the store, and not in any file left: say so, and record it in the run
                what = ", ".join(f"{n:,} of {self._accepted()[t]:,} logged {t}" for t, n in missing.items())
                self._status = "failed"
                self._row |= {"status": "failed", "status_reason": "; ".join(filter(None, [
                    self._row["status_reason"], f"{what} are not in the store (their segment was unreadable)"]))}
                self._say("missing", f"batchscope: run {self.run_id}: {what} are not in the store and cannot be "
                          "put back; the run is marked failed")
                return self._with_store(lambda con: upsert_run(con, self._row), self.finish_timeout)
            return True

    def _spool_error(self) -> bool:
        """Whether run.json may be behind (it could not be rewritten): then only a write turn stores the row."""
        return "runjson" in self._warned

    def _check_store(self, repair: bool = True, wait: float | None = None) -> dict[str, int] | None:
        """Read the run back from the store (a fresh read-only connection, so from disk) and put back
        anything missing from the kept segments: {} when all is there, what is still missing after three
        tries, None if the store could not be read. The spool is deleted only after a definite answer."""
        missing: dict[str, int] = {}
        for attempt in range(3):
            try:
                with read_connection(self.db, timeout=self.finish_timeout if wait is None else wait) as con:
                    missing = missing_rows(con, self.spool, self._status)
            except (StoreError, duckdb.Error) as exc:  # e.g. a store created by someone else, no tables yet
                if repair:
                    self._say("check", f"batchscope: cannot read run {self.run_id} back from {self.db} ({exc})")
                return None
            if not missing or not repair:
                return missing

            def repair(con) -> None:
                ingest_spool(con, self.spool, replay_ingested=True)
                upsert_run(con, self._row)

            if not self._with_store(repair, self.finish_timeout):
                return None
            self._say(f"repair{attempt}", f"batchscope: the store lacked rows of run {self.run_id} after they "
                      f"were committed ({missing}); wrote them again from the spool")
        missing.pop("runs", None)
        return missing

    def _prune_kept(self) -> None:
        """Past keep_bytes, look the oldest kept segments up in the store (a fresh connection, after the
        commit's own closed) and drop them if every row is there; if not, keep them for finish() to repair.
        Call with the ingest lease held (no one else moves this spool's files meanwhile)."""
        kept = [(seg, seg.path.stat().st_size) for seg in self.spool.segments(ingested=True) if seg.path.exists()]
        size = sum(s for _, s in kept)
        old = []
        for seg, s in kept:
            if size <= self.keep_bytes // 2:
                break
            old.append(seg)
            size -= s
        complete: dict[str, int] = {}

        def check(con) -> None:
            tables = read_segments(old)
            if not missing_keys(con, self.run_id, tables):
                complete.update({t: data.num_rows for t, data in tables.items()})

        if old and self._with_store(check, TICK_PATIENCE) and complete:
            self.spool.drop_kept(old, complete)

    def _ingest_loop(self) -> None:
        """Take a turn as the store's ingester when one is due (collector/ingester.py)."""
        while not self._stop.wait(min(self.flush_every, 1.0) * (0.8 + 0.4 * random.random())):
            try:
                if self._io_error is None and ingester.due(self.db):
                    self._ingest_turn()
            except Exception as exc:  # noqa: BLE001 - the training loop must not die because the store did
                self._say("ingest", f"batchscope: writing to {self.db} failed ({_one_line(exc)}); rows stay in "
                          f"{self.spool.dir} and will be retried")

    def _ingest_turn(self) -> None:
        lease = ingester.Lease(self.db)
        if not lease.acquire(0.0):
            return
        try:
            summary = ingester.ingest_locked(self.db, lease, on_busy=lambda: self._note_busy(True))
            self._note_busy(summary.busy)
            if not summary.busy and self.spool.bytes_written - self.spool.bytes_dropped > self.keep_bytes:
                self._prune_kept()
        except StoreError as exc:
            self._say("store", f"batchscope: {exc}; run {self.run_id} keeps spooling to {self.spool.dir}")
        finally:
            lease.release()

    def _try_ingest(self, patience: float = TICK_PATIENCE) -> bool:
        """Move this run's spool into the store under the ingest lease, retrying a busy store for up to
        `patience` seconds."""
        with ingester.Lease(self.db).held(patience) as got:
            return got and self._with_store(lambda con: ingest_spool(con, self.spool), patience)

    def _with_store(self, work, patience: float) -> bool:
        """Run work(con) in one short write connection, retrying a busy store for up to `patience` seconds;
        False if the store stayed busy or failed (which the user is told once)."""
        deadline = time.monotonic() + patience
        while True:
            try:
                with try_ingest_connection(self.db) as con:
                    if con is not None:
                        self._note_busy(False)
                        work(con)
                        return True
            except StoreError as exc:
                self._say("store", f"batchscope: {exc}; run {self.run_id} keeps spooling to {self.spool.dir}")
                return False
            except Exception as exc:  # noqa: BLE001 - the training loop must not die because the store did
                self._say("ingest", f"batchscope: writing to {self.db} failed ({_one_line(exc)}); rows stay in "
                          f"{self.spool.dir}")
                return False
            self._note_busy(True)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005 + 0.025 * random.random())

    def _note_busy(self, busy: bool) -> None:
        """Brief contention with other writers and readers is normal; only a lasting lock is news."""
        if not busy:
            self._busy_since = None
            return
        self._busy_since = self._busy_since or time.monotonic()
        if time.monotonic() - self._busy_since > self.warn_after:
            self._say("locked", f"batchscope: store {self.db} is busy (locked by another process); "
                      f"run {self.run_id} keeps spooling to {self.spool.dir} and will retry")

    def _say(self, key: str, message: str) -> None:
        """Tell the user about a store problem once per kind, on stderr."""
        if key not in self._warned:
            self._warned.add(key)
            print(message, file=sys.stderr, flush=True)



def _one_line(exc: BaseException) -> str:
    """The error's own first line (e.g. `[Errno 28] No space left on device: ...`), not a later symptom."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
