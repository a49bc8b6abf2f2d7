"""How the dashboard reads the store: short read-only connections and caches keyed by the store's version.

Following DESIGN.md's concurrency contract, the dashboard never holds the store: each read opens a
short read-only connection (collector.store.read_connection, which retries while a writer holds the
lock) and closes it at once, or at the end of a page callback's session(). Results are cached in memory
keyed by the store's *version* — the modification time and size of the DuckDB file and its WAL — so an
unchanged store is never re-read, and a store a trainer is writing to is re-read at most once per change.
The SQL itself lives in dashboard/queries.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from collector.store import is_migrated, read_connection, resolve_db
from collector.store import recover as recover_spools

_DB: Path | None = None
# Seconds a page's read waits for a writer's lock before it says "store unavailable"; tests of a busy store
# shorten it (tests/test_dashboard_security.py), users keep 5 s.
STORE_WAIT_S = float(os.environ.get("BATCHSCOPE_DASHBOARD_STORE_WAIT_S") or 5.0)


def configure(db: str | os.PathLike | None) -> Path:
    """Set the store the running dashboard serves (from --db, $BATCHSCOPE_DB or ./runs.duckdb)."""
    global _DB
    _DB = resolve_db(db).absolute()
    return _DB


def current_db() -> Path:
    return _DB if _DB is not None else configure(None)


def store_version(db: Path) -> tuple | None:
    """(mtime, size) of the DuckDB file and of its WAL: changes whenever a writer commits. None if missing."""
    try:
        st = db.stat()
    except FileNotFoundError:
        return None
    try:
        w = db.with_name(db.name + ".wal").stat()
        wal = (w.st_mtime_ns, w.st_size)
    except FileNotFoundError:
        wal = None
    return (st.st_mtime_ns, st.st_size, wal)


class _Cache:
    """A small thread-safe LRU of query results, keyed by (store, store version, query, arguments)."""

    def __init__(self, size: int = 256):
        self.size = size
        self._data: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> tuple[bool, Any]:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return True, self._data[key]
            self.misses += 1
            return False, None

    def put(self, key: tuple, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


CACHE = _Cache()


def freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple, set, frozenset)):
        return tuple(freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    return v


def cached(ttl_bucket: float | None = None) -> Callable:
    """Cache a `fn(db, ...)` by the store's version; `ttl_bucket` s also expires it with the clock
    (for results that depend on now(), such as stale detection from heartbeats)."""

    def deco(fn: Callable) -> Callable:
        @wraps(fn)
        def wrapper(db: Path, *args, **kwargs):
            db = Path(db)
            version = store_version(db)
            if version is None:
                return fn(db, *args, **kwargs)
            clock = int(time.time() // ttl_bucket) if ttl_bucket else None
            key = (fn.__name__, str(db), version, clock, freeze(args), freeze(kwargs))
            hit, value = CACHE.get(key)
            if hit:
                return value
            value = fn(db, *args, **kwargs)
            CACHE.put(key, value)
            return value

        wrapper.uncached = fn  # type: ignore[attr-defined]
        return wrapper

    return deco


# One configuration for every connection this process opens on the store (DuckDB refuses a second
# in-process connection to a file with a different configuration). The pages' own SQL needs no files or
# network either; the SQL console's queries run in worker processes with collector.sql_engine's limits.
READ_CONFIG = {
    "enable_external_access": False,  # no files, no network, no extensions (read_csv, COPY, ATTACH, INSTALL ...)
    "python_enable_replacements": False,  # no scans of this process's Python variables by name
    "allow_community_extensions": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "memory_limit": "1GB",
    "threads": 2,
    "lock_configuration": True,  # and no SET can undo the above
}


class _ReadWriteLock:
    """Many readers or one writer, within this process (recovery writes; pages and the console read)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._readers:
                self._cond.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


_RW = _ReadWriteLock()


_LOCAL = threading.local()


@contextmanager
def session(db: Path) -> Iterator[None]:
    """Within this block, every read of `db` on this thread shares one read-only connection, opened at
    the first read and closed at the end: a page's callback opens the store once, not once per query."""
    if getattr(_LOCAL, "session", None) is not None:
        yield
        return
    _LOCAL.session = {"db": str(Path(db)), "stack": None, "con": None}
    try:
        yield
    finally:
        state, _LOCAL.session = _LOCAL.session, None
        if state["stack"] is not None:
            state["stack"].close()


def in_session(fn: Callable) -> Callable:
    """Run `fn(db, ...)` inside session(db)."""

    @wraps(fn)
    def wrapper(db, *args, **kwargs):
        with session(Path(db)):
            return fn(db, *args, **kwargs)

    return wrapper


@contextmanager
def connect(db: Path, timeout: float = STORE_WAIT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short read-only connection (closed on exit, or at the end of the enclosing session());
    waits up to `timeout` s for a writer's lock."""
    state = getattr(_LOCAL, "session", None)
    if state is not None and state["db"] == str(Path(db)):
        if state["con"] is None:
            stack = ExitStack()
            try:
                state["con"] = stack.enter_context(_open(db, timeout))
            except BaseException:
                stack.close()
                raise
            state["stack"] = stack
        yield state["con"]
        return
    with _open(db, timeout) as con:
        yield con


@contextmanager
def _open(db: Path, timeout: float) -> Iterator[duckdb.DuckDBPyConnection]:
    if not is_migrated(db):
        # read_connection first brings an old store forward through a brief read-write connection with
        # DuckDB's default configuration; no other connection of ours may be open meanwhile.
        with _RW.write(), read_connection(db, timeout=timeout):
            pass
    with _RW.read(), read_connection(db, timeout=timeout, config=READ_CONFIG) as con:
        yield con


def read_frame(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> pl.DataFrame:
    return con.sql(sql, params=params).pl() if params else con.sql(sql).pl()


def recover(db: Path) -> int:
    """Ingest spools of dead writer processes (collector.store.recover), never alongside our own reads."""
    with _RW.write():
        try:
            return recover_spools(db)
        except Exception:  # noqa: BLE001 - recovery is best effort; the store stays readable
            return 0
