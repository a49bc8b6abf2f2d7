"""Every SQL statement the dashboard runs lives here, and nowhere else in dashboard/.

Following DESIGN.md's concurrency contract, the dashboard never holds the store: each read opens a
short read-only connection (collector.store.read_connection, which retries while a writer holds the
lock) and closes it at once. Results are cached in memory keyed by the store's *version* — the
modification time and size of the DuckDB file and its WAL — so an unchanged store is never re-read,
and a store a trainer is writing to is re-read at most once per change.

Reads return polars frames; the analysis library (dashboard/analysis/) turns them into numbers.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from collector.store import StoreError, is_migrated, read_connection, resolve_db

__all__ = [
    "StoreError", "ConsoleResult", "Overview", "configure", "current_db", "store_version", "overview",
    "run_table", "step_curves", "eval_curves", "steps_frame", "evals_frame", "runs_frame", "run_console",
    "clear_cache",
]

_DB: Path | None = None


def configure(db: str | os.PathLike | None) -> Path:
    """Set the store the running dashboard serves (from --db, $BATCHSCOPE_DB or ./runs.duckdb)."""
    global _DB
    _DB = resolve_db(db).absolute()
    return _DB


def current_db() -> Path:
    return _DB if _DB is not None else configure(None)


# ---------------------------------------------------------------------------------------------------
# store version and cache


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


def clear_cache() -> None:
    CACHE.clear()
    with _PER_RUN_LOCK:
        _PER_RUN.clear()
    with _FINAL_LOCK:
        _FINAL_ROWS.clear()


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple, set, frozenset)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
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
            key = (fn.__name__, str(db), version, clock, _freeze(args), _freeze(kwargs))
            hit, value = CACHE.get(key)
            if hit:
                return value
            value = fn(db, *args, **kwargs)
            CACHE.put(key, value)
            return value

        wrapper.uncached = fn  # type: ignore[attr-defined]
        return wrapper

    return deco


# One configuration for every connection this process opens on the store: DuckDB refuses a second
# in-process connection to a file with a different configuration, and the console needs this one.
READ_CONFIG = {
    "enable_external_access": False,  # no files, no network, no extensions (read_csv, COPY, ATTACH, INSTALL ...)
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


def runs_fingerprint(db: Path, run_ids: Sequence[str]) -> int:
    """A number that changes when any of these runs changes (status, steps, examples, evaluations logged
    or heartbeat), and only then: results over finished runs keep it across store versions."""
    table = run_table(db)
    cols = [c for c in ("run_id", "status", "steps", "examples", "final_test_loss", "final_train_loss",
                        "heartbeat_at") if c in table.columns]
    sub = table.filter(pl.col("run_id").is_in(_ids(run_ids))).select(cols)
    return int(sub.hash_rows(seed=1).sum()) ^ sub.height


def cached_by_runs(fn: Callable) -> Callable:
    """Cache `fn(db, run_ids, ...)` by the content of those runs (runs_fingerprint) rather than by the
    store version: a write to other runs leaves it valid."""

    @wraps(fn)
    def wrapper(db: Path, run_ids, *args, **kwargs):
        db = Path(db)
        if store_version(db) is None:
            return fn(db, run_ids, *args, **kwargs)
        key = ("by_runs", fn.__module__, fn.__name__, _store_identity(db), _freeze(sorted(run_ids)),
               runs_fingerprint(db, run_ids), _freeze(args), _freeze(kwargs))
        with _PER_RUN_LOCK:
            if key in _PER_RUN:
                _PER_RUN.move_to_end(key)
                return _PER_RUN[key]
        value = fn(db, run_ids, *args, **kwargs)
        with _PER_RUN_LOCK:
            _PER_RUN[key] = value
        return value

    return wrapper


@contextmanager
def connect(db: Path, timeout: float = 5.0) -> Iterator[duckdb.DuckDBPyConnection]:
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


def recover(db: Path) -> int:
    """Ingest spools of dead writer processes (collector.store.recover), never alongside our own reads."""
    from collector.store import recover as _recover

    with _RW.write():
        try:
            n = _recover(db)
        except Exception:  # noqa: BLE001 - recovery is best effort; the store stays readable
            return 0
    if n:
        clear_cache()
    return n


def _frame(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> pl.DataFrame:
    return con.sql(sql, params=params).pl() if params else con.sql(sql).pl()


# ---------------------------------------------------------------------------------------------------
# the store at a glance (live refresh, welcome page)


@dataclass(frozen=True)
class Overview:
    exists: bool
    runs: int = 0
    running: int = 0
    sweeps: tuple[str, ...] = ()
    error: str | None = None

    @property
    def empty(self) -> bool:
        return self.runs == 0


@cached(ttl_bucket=10)
def overview(db: Path) -> Overview:
    if store_version(db) is None:
        return Overview(exists=False)
    try:
        with connect(db) as con:
            n, running = con.sql(
                "SELECT count(*), count(*) FILTER (WHERE status = 'running') FROM run_status"
            ).fetchall()[0]
            sweeps = [r[0] for r in con.sql(
                "SELECT sweep FROM runs WHERE sweep IS NOT NULL GROUP BY sweep ORDER BY max(started_at) DESC"
            ).fetchall()]
    except (StoreError, duckdb.Error) as exc:
        return Overview(exists=True, error=str(exc).splitlines()[0])
    return Overview(exists=True, runs=int(n), running=int(running), sweeps=tuple(sweeps))


# ---------------------------------------------------------------------------------------------------
# runs


RUN_COLUMNS = (
    "run_id", "name", "sweep", "status", "task", "model", "optimizer", "lr", "momentum", "weight_decay",
    "batch_size", "accum_steps", "train_size", "seed", "device", "started_at", "ended_at", "heartbeat_at",
    "steps", "examples", "wall_time", "epochs", "final_loss", "best_loss", "final_train_loss",
    "final_test_loss", "best_test_loss", "final_train_accuracy", "final_test_accuracy", "best_test_accuracy",
    "gap_loss", "gap_accuracy", "diverged",
)


TERMINAL = ("finished", "diverged", "failed")
_FINAL_ROWS: dict[str, pl.DataFrame] = {}  # per store: run_summary rows of runs that can no longer change
_FINAL_LOCK = threading.Lock()


@cached(ttl_bucket=10)
def run_table(db: Path) -> pl.DataFrame:
    """One row per run (the `run_summary` view), newest first.

    The view reads the collector's per-run cache (run_stats), but still joins every run's evals and
    checks the cache against the steps (~70 ms for 10 million steps on two cores), so rows of finished,
    diverged and failed runs are kept between store versions and only the runs that can still change
    (running, stale, new) are summarized again after a write.
    """
    key = str(Path(db).resolve())
    with connect(db) as con:
        have = {r[0] for r in con.sql(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'run_summary'"
        ).fetchall()}
        cols = ", ".join(c for c in RUN_COLUMNS if c in have)
        current = _frame(con, "SELECT run_id, status FROM runs")
        with _FINAL_LOCK:
            final = _FINAL_ROWS.get(key)
        if final is not None and final.columns == [c for c in RUN_COLUMNS if c in have]:
            # a cached row stays valid while its run is still there with the same final status
            keep = final.join(current.rename({"status": "_now"}), on="run_id", how="inner").filter(
                pl.col("_now") == pl.col("status")).drop("_now")
        else:
            keep = None
        if keep is None or keep.is_empty():
            table = _frame(con, f"SELECT {cols} FROM run_summary")
        else:
            todo = current.filter(~pl.col("run_id").is_in(keep["run_id"].implode()))["run_id"].to_list()
            fresh = _frame(con, f"SELECT {cols} FROM run_summary WHERE run_id IN (SELECT unnest($ids))",
                           {"ids": todo}) if todo else keep.clear()
            table = pl.concat([keep, fresh], how="vertical_relaxed")
    table = table.sort(["started_at", "name"], descending=[True, False], nulls_last=True)
    with _FINAL_LOCK:
        _FINAL_ROWS[key] = table.filter(pl.col("status").is_in(TERMINAL))
    return table


def _ids(run_ids: Sequence[str]) -> list[str]:
    return sorted({str(r) for r in run_ids})


# Per-run results of finished runs outlive store versions: a trainer writing to one run must not make
# the dashboard re-read the 10 million steps of the runs that ended long ago.
_PER_RUN: OrderedDict[tuple, pl.DataFrame] = OrderedDict()
_PER_RUN_LOCK = threading.Lock()
PER_RUN_ENTRIES = 50_000


def _store_identity(db: Path) -> tuple:
    st = Path(db).stat()
    return (str(Path(db).resolve()), st.st_ino, st.st_dev)


def _final_ids(db: Path) -> set[str]:
    table = run_table(db)
    return set(table.filter(pl.col("status").is_in(TERMINAL))["run_id"].to_list())


def per_run(name: str, db: Path, run_ids: Sequence[str], params: tuple,
            fetch: Callable[[list[str]], pl.DataFrame]) -> pl.DataFrame:
    """`fetch(ids)` (one query for many runs, with a run_id column), answered per run from memory for
    runs that have finished, diverged or failed; only the others are read again."""
    ids = _ids(run_ids)
    if not ids:
        return fetch([])
    final = _final_ids(db)
    ident = _store_identity(db)
    parts, missing = [], []
    with _PER_RUN_LOCK:
        for rid in ids:
            key = (name, ident, params, rid)
            if rid in final and key in _PER_RUN:
                _PER_RUN.move_to_end(key)
                parts.append(_PER_RUN[key])
            else:
                missing.append(rid)
    if missing:
        fresh = fetch(missing)
        by_run = {k[0]: v for k, v in fresh.partition_by("run_id", as_dict=True).items()} if fresh.height else {}
        empty = fresh.clear()
        with _PER_RUN_LOCK:
            for rid in missing:
                part = by_run.get(rid, empty)
                parts.append(part)
                if rid in final:
                    _PER_RUN[(name, ident, params, rid)] = part
            while len(_PER_RUN) > PER_RUN_ENTRIES:
                _PER_RUN.popitem(last=False)
    return pl.concat(parts, how="vertical_relaxed").sort("run_id", maintain_order=True) if parts else fetch([])


@cached(ttl_bucket=10)
def runs_frame(db: Path, run_ids: Sequence[str] | None = None, sweep: str | None = None) -> pl.DataFrame:
    """run_summary rows for the given runs (or a sweep, or all runs)."""
    table = run_table(db)
    if run_ids:
        return table.filter(pl.col("run_id").is_in(_ids(run_ids)))
    if sweep:
        return table.filter(pl.col("sweep") == sweep)
    return table


# ---------------------------------------------------------------------------------------------------
# curves: server-side downsampling in DuckDB

STEP_METRICS = {"loss": "loss", "lr": "lr", "batch_size": "batch_size", "b_simple": "b_simple"}
X_AXES = ("step", "examples", "wall_time")


@cached()
def step_curves(db: Path, run_ids: Sequence[str], metric: str = "loss", x: str = "step",
                max_points: int = 1500) -> pl.DataFrame:
    """Per run, `metric` against `x` with at most ~`max_points` points per run.

    Runs with more logged steps are aggregated in DuckDB into equal-width step buckets: each bucket
    carries the mean x and y, min/max y, and how many steps it averages (`n`), so a smoothing can weight
    it. Non-finite values (diverged runs) are dropped; `last_finite_step` in run_table marks where.
    Columns: run_id, step, x, y, y_min, y_max, n.
    """
    if metric not in STEP_METRICS or x not in X_AXES:
        raise ValueError(f"unknown metric/x: {metric}/{x}")
    ids = _ids(run_ids)
    if not ids:
        return pl.DataFrame(schema={"run_id": pl.String, "step": pl.Float64, "x": pl.Float64, "y": pl.Float64,
                                    "y_min": pl.Float64, "y_max": pl.Float64, "n": pl.Int64})
    # one query fetches every metric against every x axis, so changing either is served from memory
    wide = per_run("step_curves", db, ids, (int(max_points),), lambda some: _step_curves(db, some, int(max_points)))
    return (wide.filter(pl.col(f"n_{metric}") > 0)
            .select("run_id", "step", pl.col(f"x_{x}").alias("x"), pl.col(f"y_{metric}").alias("y"),
                    pl.col(f"min_{metric}").alias("y_min"), pl.col(f"max_{metric}").alias("y_max"),
                    pl.col(f"n_{metric}").alias("n")))


def _step_curves(db: Path, ids: list[str], max_points: int) -> pl.DataFrame:
    ys = []
    for name, col in STEP_METRICS.items():
        v = f"CAST({col} AS DOUBLE)"
        ok = f"isfinite({v})"
        ys.append(f"avg({v}) FILTER (WHERE {ok}) AS y_{name}, min({v}) FILTER (WHERE {ok}) AS min_{name}, "
                  f"max({v}) FILTER (WHERE {ok}) AS max_{name}, count(*) FILTER (WHERE {ok}) AS n_{name}")
    xs = ", ".join(f"avg(CAST({x} AS DOUBLE)) AS x_{x}" for x in X_AXES)
    sql = f"""
    WITH s AS (
        SELECT * FROM steps WHERE run_id IN (SELECT unnest($ids))
    ), extent AS (
        SELECT run_id, count(*) AS cnt, min(step) AS lo, max(step) AS hi FROM s GROUP BY run_id
    ), b AS (
        SELECT s.*, CASE WHEN e.cnt <= $maxp THEN s.step
                         ELSE floor((s.step - e.lo) * $maxp / (e.hi - e.lo + 1)) END AS bucket
        FROM s JOIN extent e USING (run_id)
    )
    SELECT run_id, avg(step) AS step, {xs}, {", ".join(ys)}
    FROM b GROUP BY run_id, bucket ORDER BY run_id, step
    """
    with connect(db) as con:
        return _frame(con, sql, {"ids": ids or [""], "maxp": int(max_points)})


EVAL_METRICS = ("loss", "accuracy")


@cached()
def eval_curves(db: Path, run_ids: Sequence[str], metric: str = "loss", x: str = "step",
                splits: Sequence[str] = ("train", "test")) -> pl.DataFrame:
    """Evaluation points (few per run, not downsampled). Columns: run_id, split, step, x, y."""
    if metric not in EVAL_METRICS or x not in X_AXES:
        raise ValueError(f"unknown metric/x: {metric}/{x}")
    ids = _ids(run_ids)
    xs = {"step": "CAST(e.step AS DOUBLE)", "examples": "CAST(e.examples AS DOUBLE)",
          "wall_time": "s.wall_time"}[x]
    join = "LEFT JOIN steps s ON s.run_id = e.run_id AND s.step = e.step" if x == "wall_time" else ""
    sql = f"""
    SELECT e.run_id, e.split, CAST(e.step AS DOUBLE) AS step, {xs} AS x, CAST(e.{metric} AS DOUBLE) AS y
    FROM evals e {join}
    WHERE e.run_id IN (SELECT unnest($ids)) AND e.split IN (SELECT unnest($splits))
      AND isfinite(CAST(e.{metric} AS DOUBLE))
    ORDER BY e.run_id, e.split, e.step
    """

    def fetch(some: list[str]) -> pl.DataFrame:
        with connect(db) as con:
            return _frame(con, sql, {"ids": some or [""], "splits": list(splits)})

    return per_run("eval_curves", db, ids, (metric, x, tuple(splits)), fetch)


# ---------------------------------------------------------------------------------------------------
# frames for the analysis library

STEP_FRAME_COLUMNS = ("run_id", "step", "examples", "wall_time", "batch_size", "lr", "loss",
                      "g_small_sq", "b_small", "g_big_sq", "b_big", "b_simple")


@cached()
def steps_frame(db: Path, run_ids: Sequence[str], columns: Sequence[str] = STEP_FRAME_COLUMNS,
                every: int = 1, measured_only: bool = False) -> pl.DataFrame:
    """Raw `steps` rows of the given runs (optionally every n-th step, or only gradient-noise steps)."""
    bad = set(columns) - set(STEP_FRAME_COLUMNS)
    if bad:
        raise ValueError(f"unknown steps columns: {sorted(bad)}")
    where = ["run_id IN (SELECT unnest($ids))"]
    if every > 1:
        where.append(f"(step % {int(every)} = 0 OR step = 1)")
    if measured_only:
        where.append("g_small_sq IS NOT NULL AND g_big_sq IS NOT NULL")
    sql = f"SELECT {', '.join(columns)} FROM steps WHERE {' AND '.join(where)} ORDER BY run_id, step"
    with connect(db) as con:
        return _frame(con, sql, {"ids": _ids(run_ids) or [""]})


@cached()
def evals_frame(db: Path, run_ids: Sequence[str]) -> pl.DataFrame:
    """Raw `evals` rows of the given runs."""
    sql = """SELECT run_id, step, examples, split, loss, accuracy FROM evals
             WHERE run_id IN (SELECT unnest($ids)) ORDER BY run_id, split, step"""

    def fetch(some: list[str]) -> pl.DataFrame:
        with connect(db) as con:
            return _frame(con, sql, {"ids": some or [""]})

    return per_run("evals_frame", db, run_ids, (), fetch)


@cached()
def bucketed_steps(db: Path, run_ids: Sequence[str], width: int = 1) -> pl.DataFrame:
    """Training loss in consecutive blocks of `width` steps, per run, averaged in DuckDB.

    The same numbers as dashboard.analysis.smooth_steps(steps, width): per (run, bucket = (step-1) //
    width) the mean step, mean examples and mean finite loss (n of them), so a sweep of millions of
    steps reaches the analysis as a few hundred rows per run. `step` is rounded to an integer (the
    analysis keys curves by integer step). Columns: run_id, step, examples, loss, n.
    """
    w = max(1, int(width))
    sql = f"""
    SELECT run_id, CAST(round(avg(step)) AS BIGINT) AS step, avg(examples) AS examples, avg(loss) AS loss,
           count(*) AS n
    FROM steps
    WHERE run_id IN (SELECT unnest($ids)) AND isfinite(loss)
    GROUP BY run_id, (step - 1) // {w}
    ORDER BY run_id, step
    """

    def fetch(some: list[str]) -> pl.DataFrame:
        with connect(db) as con:
            return _frame(con, sql, {"ids": some or [""]})

    return per_run("bucketed_steps", db, run_ids, (w,), fetch)


@cached()
def run_lengths(db: Path, run_ids: Sequence[str]) -> pl.DataFrame:
    """Per run: logged steps, last step, and measured gradient-noise steps. Columns: run_id, n, last, measured."""
    sql = """SELECT run_id, count(*) AS n, max(step) AS last,
                    count(*) FILTER (WHERE g_small_sq IS NOT NULL AND g_big_sq IS NOT NULL) AS measured
             FROM steps WHERE run_id IN (SELECT unnest($ids)) GROUP BY run_id"""

    def fetch(some: list[str]) -> pl.DataFrame:
        with connect(db) as con:
            return _frame(con, sql, {"ids": some or [""]})

    return per_run("run_lengths", db, run_ids, (), fetch)


@cached()
def noise_steps(db: Path, run_ids: Sequence[str], per_run_rows: int = 2_000) -> pl.DataFrame:
    """Measured gradient-noise steps of the given runs (the raw ingredients), at most ~`per_run_rows`
    rows per run.

    A run with more measured steps has consecutive ones averaged in DuckDB in blocks of k (per
    (b_small, b_big) pair). The unbiased |G|^2 and tr(Sigma) estimates are linear in |g_small|^2 and
    |g_big|^2 for fixed b_small, b_big, so a block's estimate is exactly the mean of its steps'
    estimates, and the ratio-of-averages B_simple downstream is unchanged up to the smoothing's weights.
    """
    measured = ("g_small_sq IS NOT NULL AND g_big_sq IS NOT NULL AND isfinite(g_small_sq) "
                "AND isfinite(g_big_sq) AND b_big > b_small")
    sql = f"""
    WITH m AS (
        SELECT run_id, step, examples, loss, batch_size, g_small_sq, b_small, g_big_sq, b_big,
               row_number() OVER (PARTITION BY run_id ORDER BY step) - 1 AS i,
               count(*) OVER (PARTITION BY run_id) AS cnt
        FROM steps WHERE run_id IN (SELECT unnest($ids)) AND {measured}
    )
    SELECT run_id, CAST(round(avg(step)) AS BIGINT) AS step, CAST(round(avg(examples)) AS BIGINT) AS examples,
           avg(loss) FILTER (WHERE isfinite(loss)) AS loss, avg(batch_size) AS batch_size,
           avg(g_small_sq) AS g_small_sq, b_small, avg(g_big_sq) AS g_big_sq, b_big
    FROM m GROUP BY run_id, i // CAST(ceil(cnt / $rows) AS BIGINT), b_small, b_big ORDER BY run_id, step
    """

    def fetch(some: list[str]) -> pl.DataFrame:
        with connect(db) as con:
            return _frame(con, sql, {"ids": some or [""], "rows": max(1, int(per_run_rows))})

    return per_run("noise_steps", db, run_ids, (int(per_run_rows),), fetch)


# ---------------------------------------------------------------------------------------------------
# the SQL console

ALLOWED_STATEMENTS = {"SELECT", "EXPLAIN"}

EXAMPLE_QUERIES = {
    "Runs of a sweep, best first": (
        "SELECT name, batch_size, lr, status, steps, round(best_loss, 4) AS best_loss,\n"
        "       round(final_test_accuracy, 4) AS test_acc\nFROM run_summary\nORDER BY best_loss NULLS LAST\nLIMIT 50"
    ),
    "Steps and examples to a target loss": (
        "SELECT r.name, r.batch_size, r.lr, t.reached, round(t.steps) AS steps, round(t.examples) AS examples\n"
        "FROM steps_to_target(0.5, smooth := 20) t JOIN runs r USING (run_id)\n"
        "ORDER BY r.batch_size, t.steps NULLS LAST"
    ),
    "B_simple at the end of each run": (
        "SELECT r.name, r.batch_size, arg_max(n.b_simple, n.step) AS b_simple_last\n"
        "FROM noise_scale(100) n JOIN runs r USING (run_id)\nGROUP BY ALL ORDER BY r.batch_size"
    ),
    "Generalization gap by batch size": (
        "SELECT batch_size, count(*) AS runs, avg(gap_loss) AS gap_loss, avg(gap_accuracy) AS gap_accuracy\n"
        "FROM run_summary WHERE NOT diverged GROUP BY batch_size ORDER BY batch_size"
    ),
    "Tables and columns (data dictionary)": (
        "SELECT table_name, column_name, data_type, comment\nFROM duckdb_columns()\n"
        "WHERE table_name IN ('runs', 'steps', 'evals', 'scalars')\nORDER BY table_name, column_index"
    ),
}


@dataclass
class ConsoleResult:
    ok: bool
    message: str
    frame: pl.DataFrame | None = None
    truncated: bool = False
    elapsed_s: float = 0.0
    columns: list[str] = field(default_factory=list)


def check_console_sql(sql: str) -> str | None:
    """Why `sql` may not run in the console (None if it may): one read-only SELECT/EXPLAIN statement."""
    text = (sql or "").strip()
    if not text:
        return "Enter a query."
    try:
        statements = duckdb.connect(":memory:").extract_statements(text)
    except duckdb.Error as exc:
        return _clean_error(exc)
    if len(statements) != 1:
        return f"Run one statement at a time ({len(statements)} given)."
    kind = statements[0].type.name
    if kind not in ALLOWED_STATEMENTS:
        return f"{kind} statements are not allowed: the console is read-only (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN)."
    return None


def _clean_error(exc: BaseException) -> str:
    """A DuckDB error as one or a few readable lines, no traceback."""
    msg = str(exc).strip()
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    return "\n".join(lines[:6]) if lines else type(exc).__name__


def run_console(db: Path, sql: str, row_limit: int = 5000, time_limit_s: float = 10.0) -> ConsoleResult:
    """Run one read-only query with the console's protections; never raises.

    Protections: statement type allow-list (parsed by DuckDB, so comments and casing do not fool it);
    a read-only connection with external access disabled and the configuration locked (READ_CONFIG:
    no files, network or extensions, even through table functions); a watchdog that interrupts the query after
    `time_limit_s`; at most `row_limit` rows fetched (the LIMIT is pushed into the query plan).
    """
    t0 = time.perf_counter()
    why = check_console_sql(sql)
    if why:
        return ConsoleResult(False, why)
    if store_version(Path(db)) is None:
        return ConsoleResult(False, f"No store at {db}.")
    timer = None
    interrupted = threading.Event()
    try:
        with connect(Path(db)) as con:
            def _interrupt() -> None:
                interrupted.set()
                con.interrupt()

            timer = threading.Timer(time_limit_s, _interrupt)
            timer.daemon = True
            timer.start()
            rel = con.sql(sql.strip().rstrip(";"))
            if rel is None:
                return ConsoleResult(False, "The statement returned no result.")
            table = rel.limit(row_limit + 1).to_arrow_table()
    except duckdb.InterruptException:
        return ConsoleResult(False, f"Query stopped: it ran over the {time_limit_s:g} s time limit.",
                             elapsed_s=time.perf_counter() - t0)
    except (duckdb.Error, StoreError) as exc:
        if interrupted.is_set():
            return ConsoleResult(False, f"Query stopped: it ran over the {time_limit_s:g} s time limit.",
                                 elapsed_s=time.perf_counter() - t0)
        return ConsoleResult(False, _clean_error(exc), elapsed_s=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - the console shows messages, never tracebacks
        return ConsoleResult(False, f"{type(exc).__name__}: {exc}", elapsed_s=time.perf_counter() - t0)
    finally:
        if timer is not None:
            timer.cancel()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    truncated = frame.height > row_limit
    if truncated:
        frame = frame.head(row_limit)
    elapsed = time.perf_counter() - t0
    msg = f"{frame.height:,} row{'s' if frame.height != 1 else ''} in {elapsed * 1000:.0f} ms"
    if truncated:
        msg += f" (stopped at the {row_limit:,}-row limit)"
    return ConsoleResult(True, msg, frame=frame, truncated=truncated, elapsed_s=elapsed, columns=frame.columns)
