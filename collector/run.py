"""The logging API a training loop calls: `start_run(...)` and the `Run` it returns.

log_* calls only append to in-memory buffers (a few microseconds). A background thread spools the
buffers to Arrow segments about once a second and then moves them into DuckDB in a short transaction.
If the store is locked, missing or broken the run keeps spooling and says so once: the training loop
is never failed or slowed by the store.
"""

from __future__ import annotations

import atexit
import math
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from numbers import Real
from operator import itemgetter
from pathlib import Path

import numpy as np
import pyarrow as pa

from collector.ingest import (
    RUN_COLUMNS,
    ingest_spool,
    missing_keys,
    missing_rows,
    read_segments,
    recover_spools,
)
from collector.spool import Spool
from collector.store import StoreError, resolve_db, spool_root, try_write_connection

STEP_COLUMNS = ("step", "examples", "wall_time", "batch_size", "lr", "loss",
                "g_small_sq", "b_small", "g_big_sq", "b_big", "b_simple")
_STEP_TYPES = (pa.int64(), pa.int64(), pa.float64(), pa.int32(), pa.float64(), pa.float64(),
               pa.float64(), pa.float64(), pa.float64(), pa.float64(), pa.float64())
_EVAL_TYPES = {"step": pa.int64(), "split": pa.string(), "examples": pa.int64(), "loss": pa.float64(),
               "accuracy": pa.float64()}
_SCALAR_TYPES = {"step": pa.int64(), "name": pa.string(), "value": pa.float64()}
_FAST = {float, int, type(None)}
_META = frozenset(RUN_COLUMNS) - {"run_id", "name", "sweep", "status", "config", "started_at", "ended_at", "host"}
HEARTBEAT_EVERY = 10.0  # seconds between store writes when there is nothing new to write
BUSY_WARN_AFTER = 30.0  # seconds the store may stay locked (e.g. a DuckDB CLI left open) before the user is told
TICK_PATIENCE = 2.0  # seconds a background flush keeps retrying a locked store before the next tick
KEEP_BYTES = 256 * 2**20  # ingested segments a run keeps for its end-of-run check before checking and dropping the oldest


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat()


def _number(name: str, v):
    """Accept Python and NumPy real numbers (and 0-d arrays); reject strings, tensors needing sync, etc."""
    if v is None or type(v) in (float, int):
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (Real, np.number)) or (isinstance(v, np.ndarray) and v.ndim == 0):
        return v.item() if hasattr(v, "item") else float(v)
    raise TypeError(f"{name} must be a real number, got {type(v).__name__}: {v!r:.60}")


class Run:
    """One training run being logged. Create it with `collector.start_run`."""

    def __init__(self, db=None, *, name: str, sweep: str | None = None, config: Mapping | None = None,
                 flush_every: float = 1.0, finish_timeout: float = 60.0, warn_after: float = BUSY_WARN_AFTER,
                 keep_bytes: int = KEEP_BYTES, **meta):
        if not isinstance(name, str) or not name.strip():
            raise ValueError("run name must be a non-empty string")
        unknown = set(meta) - _META
        if unknown:
            raise ValueError(f"unknown run field(s) {sorted(unknown)}; allowed: {sorted(_META)}")
        self.db: Path = resolve_db(db)
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self.run_id = uuid.uuid4().hex[:12]
        self.name, self.sweep = name, sweep
        self._row = {c: None for c in RUN_COLUMNS} | dict(meta) | {
            "run_id": self.run_id, "name": name, "sweep": sweep, "status": "running",
            "config": dict(config or {}), "started_at": _utcnow(), "host": socket.gethostname(),
        }
        self._row.setdefault("world_size", 1)
        self._t0 = time.perf_counter()
        # Plain lists: append (hot path) and the flusher's take-prefix-then-delete are each atomic under the GIL.
        self._steps: list[tuple] = []
        self._evals: list[tuple] = []
        self._scalars: list[tuple] = []
        self._tables: deque[tuple[str, pa.Table]] = deque()  # blocks from log_steps
        self._diverged = False
        self._status: str | None = None
        self._warned: set[str] = set()
        self._last_ingest = 0.0
        self._busy_since: float | None = None
        self.flush_every, self.finish_timeout, self.warn_after = flush_every, finish_timeout, warn_after
        self.keep_bytes = keep_bytes
        self.spool = Spool(spool_root(self.db), self.run_id, keep_ingested=True)
        self.spool.create_and_own()
        self.spool.write_run(self._row)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"batchscope-{self.run_id}", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    # --- logging (hot path) ----------------------------------------------------------------------
    def log_step(self, step: int, examples=None, loss=None, lr=None, batch_size=None, g_small_sq=None,
                 b_small=None, g_big_sq=None, b_big=None, b_simple=None, wall_time=None, **extra) -> None:
        """Record one optimizer step. Unknown keywords are stored in `scalars` under their name."""
        if wall_time is None:
            wall_time = time.perf_counter() - self._t0
        row = (step, examples, wall_time, batch_size, lr, loss, g_small_sq, b_small, g_big_sq, b_big, b_simple)
        for v in row:
            if v.__class__ not in _FAST:
                row = tuple(_number(c, x) for c, x in zip(STEP_COLUMNS, row, strict=True))
                break
        if type(row[0]) is not int:
            raise TypeError(f"step must be an integer, got {row[0]!r}")
        loss = row[5]
        if loss is not None and not -math.inf < loss < math.inf:
            self._diverged = True
        self._steps.append(row)
        if extra:
            self.log(step, **extra)

    def log_steps(self, columns: Mapping[str, Sequence | np.ndarray]) -> None:
        """Record a block of steps at once (columns of equal length); the trainer's path for device-side stats."""
        if "step" not in columns:
            raise ValueError("log_steps needs a 'step' column")
        arrays = {k: np.asarray(v) for k, v in columns.items()}
        n = len(arrays["step"])
        for k, a in arrays.items():
            if a.shape != (n,):
                raise ValueError(f"log_steps column {k!r} has shape {a.shape}, expected ({n},)")
            if a.dtype.kind not in "iufb":
                raise TypeError(f"log_steps column {k!r} must be numeric, got dtype {a.dtype}")
        if n == 0:
            return
        if "wall_time" not in arrays:
            arrays["wall_time"] = np.full(n, time.perf_counter() - self._t0)
        if "loss" in arrays and not np.isfinite(arrays["loss"].astype(float)).all():
            self._diverged = True
        known = {c: pa.array(arrays[c], type=t) for c, t in zip(STEP_COLUMNS, _STEP_TYPES, strict=True)
                 if c in arrays}
        self._tables.append(("steps", pa.table(known)))
        for name in set(arrays) - set(STEP_COLUMNS):
            self._tables.append(("scalars", pa.table({
                "step": known["step"],
                "name": pa.array(np.full(n, name, dtype=object), type=pa.string()),
                "value": pa.array(arrays[name], type=pa.float64())})))

    def log_eval(self, step: int, split: str = "test", loss=None, accuracy=None, examples=None) -> None:
        """Record an evaluation on a data split (train, test, ...)."""
        if not isinstance(split, str) or not split:
            raise ValueError("split must be a non-empty string such as 'test'")
        self._evals.append((_number("step", step), split, _number("examples", examples),
                            _number("loss", loss), _number("accuracy", accuracy)))

    def log(self, step: int, **values) -> None:
        """Record free-form scalars, like wandb.log: run.log(step, grad_norm=1.3)."""
        step = _number("step", step)
        for name, v in values.items():
            if not name:
                raise ValueError("scalar names must be non-empty")
            self._scalars.append((step, name, _number(name, v)))

    # --- ending ----------------------------------------------------------------------------------
    def finish(self, status: str | None = None) -> None:
        """End the run (finished, or diverged if a non-finite loss was logged) and move everything to the store."""
        if self._status is not None:
            return
        self._status = status or ("diverged" if self._diverged else "finished")
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._row |= {"status": self._status, "ended_at": _utcnow()}
        self._spool_buffers()
        self.spool.write_run(self._row)
        if not (self._try_ingest(patience=self.finish_timeout) and self._check_store()):
            self._say("final", f"batchscope: run {self.run_id} is not (all) in {self.db} yet; its rows are "
                      f"safe in {self.spool.dir} and will be moved by `python -m collector ingest` (or the next "
                      "run or dashboard)")
            self.spool.release()
            return
        self.spool.remove()
        self.spool.release()

    def _check_store(self) -> bool:
        """Read the run back from the store (a fresh connection, so from disk) and put back anything
        missing from the kept segments. The spool is deleted only after this says True."""
        for attempt in range(3):
            missing: dict[str, int] = {}

            def check_and_repair(con, missing=missing) -> None:
                missing.update(missing_rows(con, self.spool, self._status))
                if missing:
                    ingest_spool(con, self.spool, replay_ingested=True)

            if not self._with_store(check_and_repair, self.finish_timeout):
                return False
            if not missing:
                return True
            self._say(f"repair{attempt}", f"batchscope: the store lacked rows of run {self.run_id} after they "
                      f"were committed ({missing}); wrote them again from the spool")
        return False

    def _prune_kept(self) -> None:
        """Past keep_bytes, look the oldest kept segments up in the store (a fresh connection, after the
        commit's own closed) and drop them if every row is there; if not, keep them for finish() to repair."""
        old, size = [], self.spool.kept_bytes
        for seg in self.spool.segments(ingested=True):
            if size <= self.keep_bytes // 2:
                break
            old.append(seg)
            size -= seg.path.stat().st_size
        complete = []

        def check(con) -> None:
            if not missing_keys(con, self.run_id, read_segments(old)):
                complete.extend(old)

        if self._with_store(check, TICK_PATIENCE) and complete:
            self.spool.drop_kept(complete)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("failed" if exc_type is not None else None)

    def _atexit(self) -> None:
        if self._status is None:  # the script ended without finish(): record what it logged
            self.finish()

    # --- background ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            recover_spools(self.db)
        except Exception as exc:  # noqa: BLE001 - recovery of others' runs must never hurt this one
            self._say("recover", f"batchscope: could not recover old spools: {exc}")
        backoff = 1
        while not self._stop.is_set():
            wrote = self._spool_buffers()
            if wrote or time.monotonic() - self._last_ingest > HEARTBEAT_EVERY:
                ok = self._try_ingest()
                if ok and self.spool.kept_bytes > self.keep_bytes:
                    self._prune_kept()
                # Under contention write less often (bigger batches, fewer lock grabs), up to 8x.
                backoff = 1 if ok else min(backoff * 2, 8)
            self._wake.wait(self.flush_every * backoff)

    def _spool_buffers(self) -> bool:
        """Move buffered rows to durable segment files; True if anything was written."""
        wrote = False
        for table, data in self._drain():
            self.spool.write_segment(table, data)
            wrote = True
        return wrote

    def _drain(self) -> list[tuple[str, pa.Table]]:
        """Buffered rows as one Arrow table per store table (without run_id: the spool folder says whose
        rows they are). One segment per table per flush: a trainer's many small blocks must not cost an
        fsync each."""
        out = []
        while self._tables:
            out.append(self._tables.popleft())
        for table, buffer, types in (("steps", self._steps, dict(zip(STEP_COLUMNS, _STEP_TYPES, strict=True))),
                                     ("evals", self._evals, _EVAL_TYPES), ("scalars", self._scalars, _SCALAR_TYPES)):
            n = len(buffer)
            rows = buffer[:n]
            del buffer[:n]
            if rows:  # column by column: pa.array over a list is ~50x faster than over zip(*rows) tuples
                out.append((table, pa.table({c: pa.array(list(map(itemgetter(i), rows)), type=t)
                                             for i, (c, t) in enumerate(types.items())})))
        by_table: dict[str, list[pa.Table]] = {}
        for table, data in out:
            by_table.setdefault(table, []).append(data)
        return [(t, parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default").combine_chunks())
                for t, parts in by_table.items()]

    def _try_ingest(self, patience: float = TICK_PATIENCE) -> bool:
        """Move the spool into the store, retrying a lock conflict for up to `patience` seconds."""
        def ingest(con) -> None:
            ingest_spool(con, self.spool)
            self._last_ingest = time.monotonic()

        return self._with_store(ingest, patience)

    def _with_store(self, work, patience: float) -> bool:
        """Run work(con) in one short write connection, retrying a busy store for up to `patience` seconds;
        False if the store stayed busy or failed (which the user is told once)."""
        deadline = time.monotonic() + patience
        while True:
            try:
                with try_write_connection(self.db) as con:
                    if con is not None:
                        self._busy_since = None
                        work(con)
                        return True
            except StoreError as exc:
                self._say("store", f"batchscope: {exc}; run {self.run_id} keeps spooling to {self.spool.dir}")
                return False
            except Exception as exc:  # noqa: BLE001 - the training loop must not die because the store did
                self._say("ingest", f"batchscope: writing to {self.db} failed ({exc}); rows stay in {self.spool.dir}")
                return False
            # Brief contention with other writers and readers is normal; only a lasting lock is news.
            self._busy_since = self._busy_since or time.monotonic()
            if time.monotonic() - self._busy_since > self.warn_after:
                self._say("locked", f"batchscope: store {self.db} is busy (locked by another process); "
                          f"run {self.run_id} keeps spooling to {self.spool.dir} and will retry")
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005 + 0.025 * random.random())

    def _say(self, key: str, message: str) -> None:
        """Tell the user about a store problem once per kind, on stderr."""
        if key not in self._warned:
            self._warned.add(key)
            print(message, file=sys.stderr, flush=True)


def start_run(db: str | os.PathLike | None = None, *, name: str, sweep: str | None = None,
              config: Mapping | None = None, **meta) -> Run:
    """Start logging a run; use as a context manager so it ends with the right status."""
    return Run(db, name=name, sweep=sweep, config=config, **meta)
