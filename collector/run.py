"""The logging API a training loop calls: `start_run(...)` and the `Run` it returns.

log_* calls check each value against its column's type (collector/values.py) and append it to an
in-memory buffer (about a microsecond). A spool thread writes the buffers to durable Arrow segments
about once a second, whatever the store is doing; a separate ingest thread takes part in the store's
single-ingester rota (collector/ingester.py). A locked, missing or broken store, or a full disk, never
fails or slows the training loop: it is said once, in one line, and retried.
"""

from __future__ import annotations

import atexit
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc  # noqa: F401 - pa.ipc

from collector import remote, signals
from collector.ingest import RUN_COLUMNS
from collector.provenance import provenance
from collector.run_store import RunStore, _one_line
from collector.spool import TABLES, Spool
from collector.store import resolve_db, spool_root
from collector.values import (
    ARROW_TYPES,
    EVAL_KINDS,
    INT_RANGES,
    RUN_KINDS,
    SCALAR_KINDS,
    STEP_KINDS,
    column,
    converter,
    run_fields,
    to_float,
    to_int,
    to_json,
    to_text,
)

STEP_COLUMNS = tuple(STEP_KINDS)
_STEP_TYPES = {c: ARROW_TYPES[k] for c, k in STEP_KINDS.items()}
_EVAL_TYPES = {c: ARROW_TYPES[k] for c, k in EVAL_KINDS.items()}
_SCALAR_TYPES = {c: ARROW_TYPES[k] for c, k in SCALAR_KINDS.items()}
_META = frozenset(RUN_KINDS) - {"name", "sweep", "config", "status_reason"}
_EXACT = 2**53  # ints up to this are stored exactly by a DOUBLE (and are in every integer column's range)
_I32 = INT_RANGES["INTEGER"]
BUSY_WARN_AFTER = 30.0  # seconds the store may stay locked (e.g. a DuckDB CLI left open) before the user is told
KEEP_BYTES = 256 * 2**20  # ingested segments a run keeps for its end-of-run check before checking and dropping the oldest
MAX_BUFFERED_ROWS = 2_000_000  # rows kept in memory while the spool cannot be written (a full disk), per run
SEAL_ROWS = 4096  # log_step/log rows that the caller itself turns into an Arrow block (Run._seal)
_WIDTHS = {"steps": len(_STEP_TYPES), "evals": len(_EVAL_TYPES), "scalars": len(_SCALAR_TYPES)}
_SEAL_STEPS, _SEAL_SCALARS = SEAL_ROWS * _WIDTHS["steps"], SEAL_ROWS * _WIDTHS["scalars"]


_warm = threading.Lock()
_warmed = False


def _warm_up() -> None:
    """Pay pyarrow's first-use costs now, in the caller's thread, once per process: its first conversion
    imports pandas (when installed; ~0.4 s), and in the spool thread, next to a hot training loop that
    holds the GIL, that import crawled for many seconds during which nothing was spooled (a SIGKILL then
    lost everything logged so far)."""
    global _warmed
    with _warm:
        if not _warmed:
            table = pa.table({"x": pa.array([0.0], type=pa.float64())})
            with pa.ipc.new_file(pa.BufferOutputStream(), table.schema,
                                 options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
                writer.write_table(table)
            _warmed = True


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat()


class Run(RunStore):
    """One training run being logged. Create it with `collector.start_run`."""

    def __init__(self, db=None, *, name: str, sweep: str | None = None, config: Mapping | None = None,
                 flush_every: float = 0.5, finish_timeout: float = 60.0, warn_after: float = BUSY_WARN_AFTER,
                 keep_bytes: int = KEEP_BYTES, max_buffered_rows: int = MAX_BUFFERED_ROWS, **meta):
        if not isinstance(name, str) or not name.strip():
            raise ValueError("run name must be a non-empty string")
        unknown = set(meta) - _META
        if unknown:
            raise ValueError(f"unknown run field(s) {sorted(unknown)}; allowed: {sorted(_META)}")
        meta = provenance() | meta  # where it ran (collector/provenance.py); explicit fields win
        fields = run_fields(meta) | {"name": to_text(name, "name"),
                                     "sweep": None if sweep is None else to_text(sweep, "sweep"),
                                     "config": to_json(config or {})}
        url = remote.remote_url(db)  # http(s)://...: spool here, ship to that server (collector/remote.py)
        self.db: Path | str = url or resolve_db(db)
        spool_db = remote.local_spool_db(url) if url else self.db
        spool_db.parent.mkdir(parents=True, exist_ok=True)
        self.run_id = uuid.uuid4().hex[:12]
        self.name, self.sweep = name, sweep
        self._row = {c: None for c in RUN_COLUMNS} | fields | {
            "run_id": self.run_id, "status": "running", "started_at": _utcnow(), "host": socket.gethostname()}
        if self._row["world_size"] is None:
            self._row["world_size"] = 1
        self._t0 = time.perf_counter()
        # Flat lists, one row after another: list.extend(row) (hot path) and the spooler's take-prefix-then-
        # delete are each atomic under the GIL, and the spooler cuts columns out with strided slices.
        self._steps: list = []
        self._evals: list = []
        self._scalars: list = []
        self._tables: deque[tuple[str, pa.Table]] = deque()  # blocks from log_steps
        self._names: set[str] = set()  # scalar names already checked
        # Rows accepted at the call, per table: what the end-of-run check holds the store to.
        self._n_steps = self._n_evals = self._n_scalars = 0
        self._pending: deque[tuple[str, pa.Table]] = deque()  # drained, not yet in a segment (disk full)
        self._lost = dict.fromkeys(TABLES, 0)  # dropped past max_buffered_rows
        self._io_error: str | None = None  # the spool's last write error, while it lasts
        self._diverged = False
        self._status: str | None = None
        self._warned: set[str] = set()
        self._busy_since: float | None = None
        self.flush_every, self.finish_timeout, self.warn_after = flush_every, finish_timeout, warn_after
        self.keep_bytes, self.max_buffered_rows = keep_bytes, max_buffered_rows
        self._spool_lock = threading.RLock()  # RLock: a signal handler may flush while the main thread spools
        self._take_lock = threading.Lock()  # the flat buffers have two takers: the spool thread and _seal
        self._stopped_by: str | None = None  # a signal that stopped the program (collector/signals.py)
        self._flushers: list[Callable[[], None]] = []  # code holding rows for this run (add_flusher)
        _warm_up()
        self.spool = Spool(spool_root(spool_db), self.run_id, keep_ingested=True)
        self.spool.create_and_own()
        self.spool.write_run(self._row)
        self._stop = threading.Event()
        self._shipper = remote.Shipper(self, url) if url else None
        second = ("ship", self._shipper.loop) if self._shipper else ("ingest", self._ingest_loop)
        self._threads = [threading.Thread(target=target, name=f"batchscope-{what}-{self.run_id}", daemon=True)
                         for what, target in (("spool", self._spool_loop), second)]
        for t in self._threads:
            t.start()
        atexit.register(self._atexit)
        signals.watch(self)

    # --- logging (hot path) ----------------------------------------------------------------------
    def log_step(self, step: int, examples=None, loss=None, lr=None, batch_size=None, g_small_sq=None,
                 b_small=None, g_big_sq=None, b_big=None, b_simple=None, wall_time=None, **extra) -> None:
        """Record one optimizer step. Unknown keywords are stored in `scalars` under their name."""
        if wall_time is None:
            wall_time = time.perf_counter() - self._t0
        row = (step, examples, wall_time, batch_size, lr, loss, g_small_sq, b_small, g_big_sq, b_big, b_simple)
        # Fast path: floats, None, and ints small enough for every column; else the full check.
        for v in row:
            if v.__class__ is not float and v is not None and (v.__class__ is not int or not -_EXACT <= v <= _EXACT):
                row = self._checked_step(row)
                break
        else:
            if (step.__class__ is not int or examples.__class__ is float or batch_size.__class__ is float
                    or (batch_size is not None and not _I32[0] <= batch_size <= _I32[1])):
                row = self._checked_step(row)
        loss = row[5]
        if loss is not None and not -math.inf < loss < math.inf:
            self._diverged = True
        self._steps.extend(row)
        self._n_steps += 1
        if len(self._steps) >= _SEAL_STEPS:
            self._seal("steps")
        if extra:
            self.log(step, **extra)

    def _checked_step(self, row: tuple) -> tuple:
        if row[0] is None:
            raise TypeError("step must be an integer, got None")
        return tuple(converter(kind, name)(v) for (name, kind), v in zip(STEP_KINDS.items(), row, strict=True))

    def log_steps(self, columns: Mapping[str, Sequence | np.ndarray]) -> None:
        """Record a block of steps at once (columns of equal length); the trainer's path for device-side stats.
        Columns other than the steps table's go to `scalars` under their name."""
        if "step" not in columns:
            raise ValueError("log_steps needs a 'step' column")
        step = column(columns["step"], "step", STEP_KINDS["step"], None)
        n = len(step)
        if step.null_count:
            raise TypeError("log_steps column 'step' must not hold None")
        known = {"step": step}
        extra = {}
        for k, v in columns.items():
            if k == "step":
                continue
            if k in STEP_KINDS:
                known[k] = column(v, k, STEP_KINDS[k], n)
            else:
                self._check_name(k)
                extra[k] = column(v, k, "DOUBLE", n)
        if n == 0:
            return
        if "wall_time" not in known:
            known["wall_time"] = pa.array(np.full(n, time.perf_counter() - self._t0))
        if "loss" in known and pc.any(pc.invert(pc.is_finite(known["loss"]))).as_py():
            self._diverged = True
        blocks = [("steps", pa.table(known))]
        for name, values in extra.items():
            blocks.append(("scalars", pa.table({"step": step, "name": pa.repeat(pa.scalar(name), n), "value": values})))
        self._tables.extend(blocks)
        self._n_steps += n
        self._n_scalars += n * len(extra)

    def log_eval(self, step: int, split: str = "test", loss=None, accuracy=None, examples=None) -> None:
        """Record an evaluation on a data split (train, test, ...)."""
        if not isinstance(split, str) or not split:
            raise ValueError("split must be a non-empty string such as 'test'")
        self._evals.extend((to_int(step, "step"), to_text(split, "split"),
                            None if examples is None else to_int(examples, "examples"),
                            None if loss is None else to_float(loss, "loss"),
                            None if accuracy is None else to_float(accuracy, "accuracy")))
        self._n_evals += 1

    def log(self, step: int, **values) -> None:
        """Record free-form scalars, like wandb.log: run.log(step, grad_norm=1.3)."""
        step = to_int(step, "step")
        rows = []
        for name, v in values.items():
            self._check_name(name)
            rows.extend((step, name, None if v is None else to_float(v, name)))
        self._scalars.extend(rows)
        self._n_scalars += len(rows) // 3
        if len(self._scalars) >= _SEAL_SCALARS:
            self._seal("scalars")

    def _check_name(self, name) -> None:
        if name not in self._names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"scalar names must be non-empty strings, got {name!r:.60}")
            to_text(name, "scalar name")
            self._names.add(name)

    # --- ending ----------------------------------------------------------------------------------
    def finish(self, status: str | None = None, reason: str | None = None) -> None:
        """End the run (finished, or diverged if a non-finite loss was logged) and move everything to the store.

        Every row accepted at the call is accounted for: if some could not be spooled (a disk that
        stayed full), the run ends `failed` with the count and the cause in `status_reason`, and on stderr."""
        if self._status is not None:
            return
        if self._stopped_by is not None:  # the loop was stopped by a signal, whatever ended the run after it
            status, reason = "failed", self._stopped_by
        self._status = status or ("diverged" if self._diverged else "finished")
        signals.finishing(self, True)
        try:
            self._finish(reason)
        finally:
            signals.finishing(self, False)
            signals.forget(self)

    def _finish(self, reason: str | None) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        deadline = time.monotonic() + self.finish_timeout
        while not self._spool_buffers() and self._pending and time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        lost = self._unspooled()
        if lost:
            what = ", ".join(f"{n:,} of {self._accepted()[t]:,} logged {t}" for t, n in lost.items())
            cause = self._io_error or ("dropped past max_buffered_rows" if any(self._lost.values()) else "not spooled")
            reason = "; ".join(filter(None, [reason, f"lost {what}: {cause}"]))
            self._status = "failed"
            self._say("lost", f"batchscope: run {self.run_id} lost {what} ({cause}); everything "
                      "else it logged is stored or in its spool")
        self._row |= {"status": self._status, "ended_at": _utcnow(), "status_reason": reason}
        self._write_run()
        if not (self._shipper.finish() if self._shipper else self._store_final()):
            self._say("final", self._shipper.not_stored_message() if self._shipper else
                      f"batchscope: run {self.run_id} is not (all) in {self.db} yet; its "
                      f"{'other ' if lost else ''}rows are safe in {self.spool.dir} and will be moved by "
                      "`python -m collector ingest` (or the next run or dashboard)")
            self.spool.release()
            return
        self.spool.remove()
        self.spool.release()

    def add_flusher(self, flush: Callable[[], None]) -> None:
        """Register code that holds rows for this run before logging them (a block waiting for its online
        B_simple, a step waiting for its all-reduce): a SIGTERM or SIGINT calls `flush` first, so that what
        it holds is logged before the run flushes or ends. `flush` runs in a signal handler: it must take
        only what is ready (never wait on other processes) and leave its state consistent; code that
        changes that state should do it inside `collector.signals.deferred()`."""
        self._flushers.append(flush)

    def flush_held(self) -> None:
        """Call the registered flushers (see add_flusher); one that raises is reported, not fatal."""
        for flush in self._flushers:
            try:
                flush()
            except Exception as exc:  # a signal is ending the program: log what the others hold
                print(f"batchscope: run {self.run_id}: a flusher failed at a signal ({type(exc).__name__}: "
                      f"{exc}); the rows it held are not logged", file=sys.stderr, flush=True)

    def stopped_by(self, signal_name: str) -> None:
        """A signal stopped the program (which goes on to its own handling): flush now, and end as
        failed with the signal's name whenever the run ends."""
        self._stopped_by = signal_name
        self._spool_buffers()

    def _accepted(self) -> dict[str, int]:
        return {"steps": self._n_steps, "evals": self._n_evals, "scalars": self._n_scalars}

    def _unspooled(self) -> dict[str, int]:
        """Per table, rows accepted at the call that never reached a segment ({} when none)."""
        return {t: n - self.spool.rows_written[t] for t, n in self._accepted().items()
                if n > self.spool.rows_written[t]}

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.finish("failed", reason=f"{exc_type.__name__}: {exc}"[:500])

    def _atexit(self) -> None:
        if self._status is None:  # the script ended without finish(): record what it logged
            self.finish()

    # --- background ------------------------------------------------------------------------------
    def _spool_loop(self) -> None:
        """Every flush_every s: buffers -> durable segments. Never waits on the store. At a fixed rate:
        the time a write takes is not added to the interval (so a SIGKILL loses at most ~flush_every s
        plus one write)."""
        due = time.monotonic() + self.flush_every
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            self._spool_buffers()
            due = max(due + self.flush_every, time.monotonic() + 0.05 * self.flush_every)

    def _spool_buffers(self) -> bool:
        """Move buffered rows to durable segment files; True once nothing is left waiting. On a write
        error (a full disk) the rows stay in memory, up to max_buffered_rows, for the next try."""
        with self._spool_lock:
            self._pending.extend(self._drain())
            while self._pending:
                table, data = self._pending[0]
                try:
                    self.spool.write_segment(table, data)
                except OSError as exc:
                    self._io_error = _one_line(exc)
                    self._say("spool", f"batchscope: cannot write to the spool of run {self.run_id} ({self._io_error}); "
                              f"keeping its rows in memory (up to {self.max_buffered_rows:,}) and retrying")
                    self._bound_pending()
                    return False
                self._pending.popleft()
            if self._io_error is not None:
                self._io_error = None
                self._warned.discard("spool")
                print(f"batchscope: run {self.run_id} writes its spool again; nothing waiting in memory was lost",
                      file=sys.stderr, flush=True)
            return True

    def _bound_pending(self) -> None:
        """Past max_buffered_rows, drop the oldest rows waiting for the spool (counted, reported at finish)."""
        total = sum(d.num_rows for _, d in self._pending)
        while total > self.max_buffered_rows and self._pending:
            table, data = self._pending.popleft()
            total -= data.num_rows
            self._lost[table] += data.num_rows

    def _write_run(self) -> None:
        try:
            self.spool.write_run(self._row)
        except OSError as exc:
            self._say("runjson", f"batchscope: cannot rewrite {self.spool.dir / 'run.json'} ({_one_line(exc)}); "
                      "the final status goes to the store directly")

    def _drain(self) -> list[tuple[str, pa.Table]]:
        """Buffered rows as one Arrow table per store table (without run_id: the spool folder says whose
        rows they are). One segment per table per flush: a trainer's many small blocks must not cost an
        fsync each."""
        out = []
        while self._tables:
            out.append(self._tables.popleft())
        for table in _WIDTHS:
            data = self._take(table)
            if data is not None:
                out.append((table, data))
        by_table: dict[str, list[pa.Table]] = {}
        for table, data in out:
            by_table.setdefault(table, []).append(data)
        return [(t, parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default").combine_chunks())
                for t, parts in by_table.items()]

    def _take(self, table: str) -> pa.Table | None:
        """The rows waiting in a flat buffer, as an Arrow table (None if none), removed from the buffer."""
        buffer, types = {"steps": (self._steps, _STEP_TYPES), "evals": (self._evals, _EVAL_TYPES),
                         "scalars": (self._scalars, _SCALAR_TYPES)}[table]
        width = len(types)
        with self._take_lock:
            n = len(buffer) // width * width
            rows = buffer[:n]
            del buffer[:n]
        if not rows:
            return None
        # Column by column from strided slices: ~35% faster than itemgetter over row tuples.
        return pa.table({c: pa.array(rows[i::width], type=t) for i, (c, t) in enumerate(types.items())})

    def _seal(self, table: str) -> None:
        """Turn SEAL_ROWS rows of a flat buffer into an Arrow block now, in the logging thread (a few ms
        every few thousand calls). Why: in a hot loop the spool thread's own conversion fought the loop
        for the GIL, segments then came every 1-2 s instead of every flush_every s, and a SIGKILL lost
        that much; now the spool thread has at most SEAL_ROWS rows per table to convert. Signals wait
        meanwhile, so that a handler's flush never misses rows held here (collector/signals.py)."""
        with signals.deferred():
            data = self._take(table)
            if data is not None:
                self._tables.append((table, data))


def start_run(db: str | os.PathLike | None = None, *, name: str, sweep: str | None = None,
              config: Mapping | None = None, **meta) -> Run:
    """Start logging a run; use as a context manager so it ends with the right status. In the main
    thread, SIGTERM and SIGINT end it too (collector/signals.py)."""
    return Run(db, name=name, sweep=sweep, config=config, **meta)
