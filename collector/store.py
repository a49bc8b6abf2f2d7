"""Short-lived connections to the DuckDB store, following DESIGN.md's concurrency contract.

DuckDB lets one process open a file read-write, or many read-only, never both. Nobody here keeps the
file open: writers open, append and close in milliseconds; readers do the same read-only, retrying
(with jitter, bounded in time) while a writer holds the lock.

Every connection is also bracketed by batchscope's own lock (an flock on <db>.spool/store.lock,
exclusive for writers, shared for readers), taken before DuckDB opens the file and released after it
has closed it. DuckDB's lock covers an open database only; ours also covers DuckDB's open and its
checkpoint-and-close, so two batchscope processes never interleave those steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import tenacity

from schema import SCHEMA_VERSION, ensure_schema, store_version
from schema.migrations import sql_digest

DEFAULT_DB = "runs.duckdb"
LOCK_FILE = "store.lock"
_MIGRATED: set[str] = set()


class StoreError(Exception):
    """A store problem worth one clear line to the user (missing, corrupt, not a file, ...)."""


class StoreLockedError(StoreError):
    """Another process holds the store's write lock for longer than we were willing to wait."""


def resolve_db(db: str | os.PathLike | None = None) -> Path:
    """The store path: the argument, else $BATCHSCOPE_DB, else ./runs.duckdb."""
    path = Path(db or os.environ.get("BATCHSCOPE_DB") or DEFAULT_DB).expanduser()
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a DuckDB file; pass a file path such as {path / DEFAULT_DB}")
    return path


def spool_root(db: Path) -> Path:
    """Spool folder next to the store: <db>.spool/<run_id>/ per run."""
    return db.with_name(db.name + ".spool")


class StoreBusy(Exception):
    """Another batchscope process holds the store lock (ours, taken before DuckDB's)."""

    def __init__(self, message: str, lock: Path):
        super().__init__(message)
        self.lock = lock


def is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, StoreBusy) or (isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower())


def _flock_holders(lock: Path) -> list[str]:
    """'program (PID n)' for each process holding an flock on `lock`, from /proc/locks ([] off Linux)."""
    try:
        st = os.stat(lock)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = []
    for fields in map(str.split, lines):  # "12: FLOCK  ADVISORY  WRITE 4242 08:01:131 0 EOF" (waiters: "12: -> FLOCK")
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
            try:
                program = Path(f"/proc/{fields[4]}/cmdline").read_bytes().split(b"\0")[0].decode() or "?"
            except OSError:
                program = "?"
            holders.append(f"{program} (PID {fields[4]})")
    return holders


def _lock_holder(exc: BaseException) -> str:
    if isinstance(exc, StoreBusy):
        return ", ".join(_flock_holders(exc.lock)) or "another batchscope process"
    m = re.search(r"held in (.+?) \(PID (\d+)\)", str(exc))
    return f"{m.group(1)} (PID {m.group(2)})" if m else "another process"


def _take_lock(db: Path, exclusive: bool) -> int | None:
    """flock <db>.spool/store.lock without waiting; the fd to close later, or None where the folder is
    read-only (then DuckDB's own lock is all there is). Raises StoreBusy if another process holds it."""
    root = spool_root(db)
    try:
        root.mkdir(exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(root / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusy(f"store {db} is in use by another batchscope process", root / LOCK_FILE) from None
    return fd


def _connect(db: Path, *, read_only: bool, config: dict | None = None) -> tuple[duckdb.DuckDBPyConnection, int | None]:
    """DuckDB connection plus the store-lock fd that must outlive it (see _close)."""
    fd = _take_lock(db, exclusive=not read_only)
    try:
        return duckdb.connect(str(db), read_only=read_only, config=config or {}), fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def _close(con: duckdb.DuckDBPyConnection, fd: int | None) -> None:
    """Close DuckDB first (its checkpoint and WAL removal happen here), then let the next process in."""
    try:
        con.close()
    finally:
        if fd is not None:
            os.close(fd)


def _explain(path: Path, exc: BaseException) -> StoreError:
    if is_lock_error(exc):
        return StoreLockedError(f"store {path} is locked by {_lock_holder(exc)}; try again when it is closed")
    msg = str(exc).splitlines()[0]
    if "not a valid DuckDB database" in msg or "Corrupt" in msg or "checksum" in msg.lower():
        return StoreError(f"{path} is not a readable DuckDB store (corrupt or another file type): {msg}")
    return StoreError(f"cannot open store {path}: {msg}")


@contextmanager
def try_write_connection(db: Path) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """A read-write connection with the schema current, or None at once if another process holds the lock."""
    try:
        con, fd = _connect(db, read_only=False)
    except (StoreBusy, duckdb.Error) as exc:
        if is_lock_error(exc):
            yield None
            return
        raise _explain(db, exc) from exc
    try:
        _migrate(con, db)
        yield con
    except BaseException:
        # The error that ended the work is the one to tell (e.g. No space left on device), not a
        # second one from closing the same file.
        with contextlib.suppress(duckdb.Error, OSError):
            _close(con, fd)
        raise
    _close(con, fd)


# --- ingest turns: the store ATTACHed to one in-memory DuckDB kept for the process ------------------
# Opening a file with duckdb.connect builds a whole DuckDB instance (its catalog of built-in functions,
# its threads) and closing it tears that down: ~20-50 ms of CPU per turn on a loaded 2-core machine,
# with the store held all along. ATTACH/DETACH of the file on an instance kept for the process does the
# same file work (DuckDB's lock, catalog read, WAL checkpoint at DETACH) in a fraction of that.
_ALIAS = "batchscope_store"
_IN_USE = getattr(duckdb, "ResourceInUseException", duckdb.IOException)
_host_lock = threading.Lock()  # one attached session per process at a time (turns are serialised anyway)
_host: tuple[int, duckdb.DuckDBPyConnection] | None = None  # (pid that created it, connection)


def _host_connection() -> duckdb.DuckDBPyConnection:
    global _host
    if _host is None or _host[0] != os.getpid():  # never reuse an instance inherited through fork()
        # Each COMMIT checkpoints straight into the file, without a WAL: 2 fsyncs (new blocks, then the
        # header that switches to them: a crash in between keeps the old state) instead of 4 (WAL at
        # COMMIT, WAL marker, blocks, header at DETACH), and no WAL for the next opener to replay.
        con = duckdb.connect(":memory:", config={"checkpoint_threshold": "0b",
                                                 "auto_checkpoint_skip_wal_threshold": 0})
        _host = (os.getpid(), con)
    return _host[1]


def _drop_host() -> None:
    """Close the host instance (after a failed DETACH it may still hold the file: closing it frees it)."""
    global _host
    if _host is not None:
        pid, con = _host
        _host = None
        if pid == os.getpid():
            with contextlib.suppress(duckdb.Error, OSError):
                con.close()


@contextmanager
def try_ingest_connection(db: Path, wait: float = 1.0) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """Like try_write_connection (None at once if another process holds the store), but cheap to open
    and close: the file is ATTACHed, as the default catalog, to an in-memory DuckDB kept for the
    process, and DETACHed (which checkpoints it) before our store lock is released. `wait`: how long to
    wait for another thread of this process that is in such a session (then None)."""
    if not _host_lock.acquire(timeout=wait):
        yield None
        return
    try:
        fd = _take_lock(db, exclusive=True)
    except StoreBusy:
        _host_lock.release()
        yield None
        return
    except BaseException:
        _host_lock.release()
        raise
    con = None
    try:
        con = _host_connection()
        try:
            con.execute(f"ATTACH '{_quote(db)}' AS {_ALIAS}")
        except duckdb.Error as exc:
            # A plain DuckDB client has the file: another process (a shell, an analyst's reader), or this
            # one (user code's own duckdb.connect: DuckDB refuses a second handle on one file).
            if is_lock_error(exc) or isinstance(exc, _IN_USE):
                con = None
                yield None
                return
            con = None
            raise _explain(db, exc) from exc
        try:
            con.execute(f"USE {_ALIAS}")
            _migrate(con, db)
            yield con
        except BaseException:
            # The error that ended the work is the one to tell (e.g. No space left on device), not a
            # second one from detaching the same file.
            _detach(con, quiet=True)
            con = None
            raise
        _detach(con, quiet=False)
        con = None
    finally:
        if fd is not None:
            os.close(fd)
        _host_lock.release()


def _quote(db: Path) -> str:
    return str(db).replace("'", "''")


def _detach(con: duckdb.DuckDBPyConnection, quiet: bool) -> None:
    """DETACH the store (DuckDB checkpoints it there); if that fails, close the whole host instance, so
    that the file is never left open behind our released lock."""
    try:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")  # a transaction left open by a failure (none after a COMMIT)
        con.execute("USE memory")
        con.execute(f"DETACH {_ALIAS}")
    except BaseException:
        _drop_host()
        if not quiet:
            raise


def _migrate(con: duckdb.DuckDBPyConnection, db: Path) -> None:
    key = str(db.resolve())
    if key not in _MIGRATED:
        ensure_schema(con)
        _MIGRATED.add(key)


def _retrying(timeout: float) -> tenacity.Retrying:
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_lock_error),
        wait=tenacity.wait_random(0.005, 0.03),  # the same short jitter writers use: equal chances
        stop=tenacity.stop_after_delay(timeout),
        reraise=True,
    )


@contextmanager
def write_connection(db: str | os.PathLike | None = None, timeout: float = 10.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short read-write connection, waiting up to `timeout` s for the lock; closed on exit."""
    path = resolve_db(db)
    with _waiting_connection(path, timeout, read_only=False) as con:
        _migrate(con, path)
        yield con


@contextmanager
def read_connection(
    db: str | os.PathLike | None = None, timeout: float = 10.0, config: dict | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short read-only connection, retrying while a writer holds the lock; closed on exit."""
    path = resolve_db(db)
    if not path.exists():
        raise StoreError(f"no store at {path}: train a run first (python -m trainer) or pass --db")
    key = str(path.resolve())
    if key not in _MIGRATED:
        # Read-only first: a store already at this release's schema (the usual case) needs no write
        # connection, which would shut plain DuckDB readers out while it is open.
        with _waiting_connection(path, timeout, read_only=True, config=config) as con:
            if store_version(con) == (SCHEMA_VERSION, _sql_digest()):
                _MIGRATED.add(key)
                yield con
                return
        _migrate_if_needed(path)
    with _waiting_connection(path, timeout, read_only=True, config=config) as con:
        yield con


@functools.cache
def _sql_digest() -> str:
    return sql_digest()


@contextmanager
def _waiting_connection(path: Path, timeout: float, *, read_only: bool,
                        config: dict | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """_connect, retried with jitter while either lock is held, for up to `timeout` s; closed on exit."""
    try:
        for attempt in _retrying(timeout):
            with attempt:
                con, fd = _connect(path, read_only=read_only, config=config)
    except (StoreBusy, duckdb.Error) as exc:
        raise _explain(path, exc) from exc
    try:
        yield con
    finally:
        _close(con, fd)


def is_migrated(db: str | os.PathLike) -> bool:
    """Whether this process has already brought `db` to the current schema (no connection needed)."""
    return str(Path(db).resolve()) in _MIGRATED


def _migrate_if_needed(path: Path) -> None:
    """Bring an old store forward once per process before reading; skip quietly if it is busy."""
    key = str(path.resolve())
    if key in _MIGRATED:
        return
    try:
        with try_write_connection(path):
            pass
    except StoreError:
        raise
    except Exception:  # noqa: BLE001 - a failed migration must not hide the data; the read reports problems
        return


def recover(db: str | os.PathLike | None = None) -> int:
    """Ingest the spools of runs whose process is gone; returns the number of runs recovered."""
    from collector.ingest import recover_spools

    return recover_spools(resolve_db(db))
