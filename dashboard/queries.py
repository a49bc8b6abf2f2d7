"""Every SQL statement the dashboard runs for its pages lives here (the console runs the user's own,
dashboard/console.py). Reads return polars frames; the analysis library (dashboard/analysis/) turns them
into numbers. Connections and the caches keyed by the store's version: dashboard/store_access.py.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

import duckdb
import polars as pl

from collector.store import StoreError
from dashboard import store_access
from dashboard.store_access import (  # re-exported: pages use queries.* as their one door to the store
    CACHE,
    cached,
    configure,
    connect,
    current_db,
    freeze,
    in_session,
    read_frame,
    session,
    store_version,
)
from schema.frames import evaluate

__all__ = [
    "StoreError", "Overview", "configure", "current_db", "store_version", "overview", "run_table",
    "step_curves", "eval_curves", "evals_frame", "runs_frame", "clear_cache", "connect", "crossings",
    "run_outcomes", "noise_scale", "smoothed_loss", "smoothed_buckets", "noise_cumulative", "with_noise",
    "session", "in_session", "cached",
]


def clear_cache() -> None:
    CACHE.clear()
    with _PER_RUN_LOCK:
        _PER_RUN.clear()
    with _FINAL_LOCK:
        _FINAL_ROWS.clear()


def recover(db: Path) -> int:
    """Ingest spools of dead writer processes; forget cached results if any run changed."""
    n = store_access.recover(db)
    if n:
        clear_cache()
    return n


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
        key = ("by_runs", fn.__module__, fn.__name__, _store_identity(db), freeze(sorted(run_ids)),
               runs_fingerprint(db, run_ids), freeze(args), freeze(kwargs))
        with _PER_RUN_LOCK:
            if key in _PER_RUN:
                _PER_RUN.move_to_end(key)
                return _PER_RUN[key]
        value = fn(db, run_ids, *args, **kwargs)
        with _PER_RUN_LOCK:
            _PER_RUN[key] = value
        return value

    return wrapper


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
        current = read_frame(con, "SELECT run_id, status FROM runs")
        with _FINAL_LOCK:
            final = _FINAL_ROWS.get(key)
        if final is not None and final.columns == [c for c in RUN_COLUMNS if c in have]:
            # a cached row stays valid while its run is still there with the same final status
            keep = final.join(current.rename({"status": "_now"}), on="run_id", how="inner").filter(
                pl.col("_now") == pl.col("status")).drop("_now")
        else:
            keep = None
        if keep is None or keep.is_empty():
            table = read_frame(con, f"SELECT {cols} FROM run_summary")
        else:
            todo = current.filter(~pl.col("run_id").is_in(keep["run_id"].implode()))["run_id"].to_list()
            fresh = read_frame(con, f"SELECT {cols} FROM run_summary WHERE run_id IN (SELECT unnest($ids))",
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
        return read_frame(con, sql, {"ids": ids or [""], "maxp": int(max_points)})


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
            return read_frame(con, sql, {"ids": some or [""], "splits": list(splits)})

    return per_run("eval_curves", db, ids, (metric, x, tuple(splits)), fetch)


# ---------------------------------------------------------------------------------------------------
# the derived quantities: thin SELECTs over the macros of schema/sql/20_analysis.sql (their one definition)


@cached()
def evals_frame(db: Path, run_ids: Sequence[str]) -> pl.DataFrame:
    """Raw `evals` rows of the given runs."""
    sql = """SELECT run_id, step, examples, split, loss, accuracy FROM evals
             WHERE run_id IN (SELECT unnest($ids)) ORDER BY run_id, split, step"""

    def fetch(some: list[str]) -> pl.DataFrame:
        with connect(db) as con:
            return read_frame(con, sql, {"ids": some or [""]})

    return per_run("evals_frame", db, run_ids, (), fetch)


def _macro(name: str, db: Path, run_ids: Sequence[str], sql: str, params: dict) -> pl.DataFrame:
    """A per-run macro call `sql` (with $ids for the runs), answered from memory for ended runs."""
    def fetch(some: list[str]) -> pl.DataFrame:
        with connect(db) as con:
            return read_frame(con, sql, {**params, "ids": some or [""]})

    return per_run(name, db, run_ids, freeze(params), fetch)


@cached()
def crossings(db: Path, run_ids: Sequence[str], targets: Sequence[float], width_examples: float = 0,
              metric: str = "train_loss", noise_window: float | None = 0.1,
              noise_for: Sequence[str] | None = None) -> pl.DataFrame:
    """SQL `crossings` for these runs: steps/examples to each target, censoring, outcome, reason and B_simple
    at the crossing, plus batch_size, lr, sweep and status.

    Composed from the macro's own parts so that a new target costs milliseconds: the target-independent
    per-run frames (smoothed points, crossing_runs, noise_cumulative) come from the store and are kept per
    ended run; `crossings_of` and `noise_window_sums` then run over them in memory (schema.frames). The
    result equals `SELECT * FROM crossings(...)` on the store (tests/test_dashboard_browser.py). B_simple is
    filled for the runs in `noise_for` (None: every run), since reading every run's measured steps is what
    costs on a large store.
    """
    ids = _ids(run_ids)
    records, info = crossing_parts(db, ids, width_examples, metric)
    tg = sorted({float(t) for t in targets}, reverse=True)
    hits = evaluate("SELECT * FROM crossings_of('r', 'i', $t, metric := $m)", {"t": tg, "m": metric},
                    r=records, i=info)
    if noise_window is None:
        return hits
    return with_noise(db, hits, ids if noise_for is None else noise_for, noise_window)


@cached()
def crossing_parts(db: Path, run_ids: Sequence[str], width_examples: float = 0,
                   metric: str = "train_loss") -> tuple[pl.DataFrame, pl.DataFrame]:
    """The target-independent parts of crossings (SQL crossing_records and crossing_runs over the runs'
    smoothed_points and run_outcomes), computed once per store version and smoothing."""
    ids = _ids(run_ids)
    key = (float(width_examples), metric)

    def records(some: list[str]) -> pl.DataFrame:
        return evaluate("SELECT * FROM crossing_records('b')", b=smoothed_buckets(db, some, width_examples, metric))

    def info(some: list[str]) -> pl.DataFrame:
        return evaluate("SELECT * FROM crossing_runs('b', 'o', run_ids := $ids)", {"ids": some or [""]},
                        b=smoothed_buckets(db, some, width_examples, metric), o=run_outcomes(db, some),
                        runs=runs_frame(db, some))

    # per run, so that a write to one run leaves the other runs' parts in memory
    return per_run("crossing_records", db, ids, key, records), per_run("crossing_runs", db, ids, key, info)


def with_noise(db: Path, hits: pl.DataFrame, run_ids: Sequence[str], noise_window: float = 0.1) -> pl.DataFrame:
    """Fill B_simple at the crossing (SQL noise_window_sums over the runs' noise_cumulative) into crossings
    rows of the given runs, as the macro crossings does."""
    pts = hits.filter(pl.col("reached") & pl.col("run_id").is_in(_ids(run_ids))).select(
        "run_id", pl.col("steps").alias("at_step")).unique()
    if pts.is_empty():
        return hits
    cum = noise_cumulative(db, sorted(set(pts["run_id"].to_list())))
    nz = evaluate("SELECT * FROM noise_window_sums('p', 'c', noise_window := $w)", {"w": float(noise_window)},
                  p=pts, c=cum)
    noise = ["b_simple", "g2", "trace_sigma", "n_noise"]
    hits = hits.join(nz.rename({"at_step": "steps"}).rename({c: f"_{c}" for c in noise}), on=["run_id", "steps"],
                     how="left")
    return hits.with_columns(
        *[pl.coalesce(f"_{c}", c).alias(c) for c in noise]).drop([f"_{c}" for c in noise])


@cached()
def noise_cumulative(db: Path, run_ids: Sequence[str]) -> pl.DataFrame:
    """SQL `noise_cumulative` (running sums of the noise estimates) for a few runs."""
    return _macro("noise_cumulative", db, run_ids, "SELECT * FROM noise_cumulative(run_ids := $ids)", {})


@cached()
def run_outcomes(db: Path, run_ids: Sequence[str]) -> pl.DataFrame:
    """SQL `run_outcomes` for these runs: trained, stalled, diverged, unfinished or failed, and why."""
    return _macro("run_outcomes", db, run_ids, "SELECT * FROM run_outcomes(run_ids := $ids)", {})


@cached()
def noise_scale(db: Path, run_ids: Sequence[str], noise_window: float = 0.1, max_rows: int = 2_000) -> pl.DataFrame:
    """SQL `noise_scale` (B_simple over training) for these runs, at most ~`max_rows` of its rows per run:
    every k-th measured step and the last one, each with its exact value (thinned, not re-averaged)."""
    return _thinned_noise("noise_scale", db, run_ids, noise_window, max_rows)


def _thinned_noise(macro: str, db: Path, run_ids: Sequence[str], noise_window: float, max_rows: int) -> pl.DataFrame:
    """A noise-scale macro's rows for these runs, every k-th measured step per run and the last one."""
    sql = f"""SELECT * FROM {macro}(noise_window := $nw, run_ids := $ids)
             WINDOW r AS (PARTITION BY run_id ORDER BY step ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
             QUALIFY (row_number() OVER r - 1) % greatest(1, ceil(count(*) OVER r / $rows)) = 0
                  OR row_number() OVER r = count(*) OVER r
             ORDER BY run_id, step"""
    return _macro(macro, db, run_ids, sql, {"nw": float(noise_window), "rows": max(1, int(max_rows))})


@cached()
def smoothed_buckets(db: Path, run_ids: Sequence[str], width_examples: float = 0,
                     metric: str = "train_loss") -> pl.DataFrame:
    """SQL `smoothed_points` over the metric's points of these runs (values lower-is-better, buckets with
    only non-finite values kept): what crossings and the target range start from."""
    return _macro("smoothed_buckets", db, run_ids,
                  "WITH mp AS (SELECT * FROM metric_points(metric := $m, run_ids := $ids)) "
                  "SELECT * FROM smoothed_points('mp', width_examples := $w) ORDER BY run_id, bucket",
                  {"w": float(width_examples), "m": metric})


def smoothed_loss(db: Path, run_ids: Sequence[str], width_examples: float = 0,
                  metric: str = "train_loss") -> pl.DataFrame:
    """SQL `smoothed_loss` for these runs (bucket means over `width_examples` examples), from the same
    buckets as crossings: run_id, bucket, step, examples, value, n."""
    b = smoothed_buckets(db, run_ids, width_examples, metric).filter(pl.col("n") > 0)
    sign = -1.0 if metric.endswith("_accuracy") else 1.0  # smoothed_points keeps accuracies negated
    return b.select("run_id", "bucket", "step", "examples", pl.col("value") * sign, "n")


# --- pages-a ---
# The Curves, Noise scale and run pages (issue 15: grouping, run page, export at full resolution;
# issue 13: tokens, the preconditioned B_simple and B_noise): thin SELECTs over schema/sql/40_pages_a.sql.

STEP_COLUMNS = ("step", "examples", "wall_time", "batch_size", "lr", "loss", "g_small_sq", "b_small", "g_big_sq",
                "b_big", "b_simple")


def full_steps(db: Path, run_ids: Sequence[str], columns: Sequence[str] = ("loss",)) -> pl.DataFrame:
    """Every stored `steps` row of these runs (no downsampling): run_id, step, examples, tokens (NULL
    without tokens), wall_time and the requested step columns."""
    cols = [c for c in dict.fromkeys(columns) if c in STEP_COLUMNS and c not in ("step", "examples", "wall_time")]
    extra = "".join(f", s.{c}" for c in cols)
    sql = f"""SELECT s.run_id, s.step, s.examples, s.examples * t.tokens_per_example AS tokens, s.wall_time{extra}
              FROM steps s LEFT JOIN run_tokens t USING (run_id)
              WHERE s.run_id IN (SELECT unnest($ids)) ORDER BY s.run_id, s.step"""
    with connect(db) as con:
        return read_frame(con, sql, {"ids": _ids(run_ids) or [""]})


def noise_scale_full(db: Path, run_ids: Sequence[str], noise_window: float = 0.1) -> pl.DataFrame:
    """SQL `noise_scale` for these runs, every measured step (what noise_scale thins for drawing)."""
    with connect(db) as con:
        return read_frame(con, "SELECT * FROM noise_scale(noise_window := $nw, run_ids := $ids) ORDER BY run_id, step",
                          {"nw": float(noise_window), "ids": _ids(run_ids) or [""]})


def full_scalars(db: Path, run_ids: Sequence[str], names: Sequence[str] = ()) -> pl.DataFrame:
    """Stored `scalars` rows of these runs (all names, or only `names`)."""
    sql = """SELECT run_id, step, name, value FROM scalars WHERE run_id IN (SELECT unnest($ids))
             AND (len($names) = 0 OR name IN (SELECT unnest($names))) ORDER BY run_id, name, step"""
    with connect(db) as con:
        return read_frame(con, sql, {"ids": _ids(run_ids) or [""], "names": [str(n) for n in names]})


@cached()
def tokens_per_example(db: Path, run_ids: Sequence[str]) -> dict[str, float]:
    """SQL `run_tokens`: tokens per training example of the runs that count tokens (others left out)."""
    with connect(db) as con:
        df = read_frame(con, "SELECT run_id, tokens_per_example FROM run_tokens WHERE run_id IN (SELECT unnest($ids))"
                        " AND tokens_per_example IS NOT NULL", {"ids": _ids(run_ids) or [""]})
    return dict(zip(df["run_id"].to_list(), df["tokens_per_example"].to_list(), strict=True))


@cached()
def noise_scale_adam(db: Path, run_ids: Sequence[str], noise_window: float = 0.1, max_rows: int = 2_000) -> pl.DataFrame:
    """SQL `noise_scale_adam` (the preconditioned B_simple) for these runs, thinned as noise_scale is."""
    return _thinned_noise("noise_scale_adam", db, run_ids, noise_window, max_rows)


@cached()
def b_noise_summary(db: Path, run_ids: Sequence[str], tail: float = 0.2) -> pl.DataFrame:
    """SQL `b_noise_summary`: B_noise and B_simple from the same evaluations, per run with curvature."""
    return _macro("b_noise_summary", db, run_ids, "SELECT * FROM b_noise_summary(tail := $tail, run_ids := $ids)",
                  {"tail": float(tail)})


@cached(ttl_bucket=10)
def run_record(db: Path, run_id: str) -> dict | None:
    """Everything `runs` holds about one run (config, provenance, status) merged with its run_summary row."""
    with connect(db) as con:
        rows = read_frame(con, "SELECT * FROM runs WHERE run_id = $id", {"id": str(run_id)}).to_dicts()
    if not rows:
        return None
    summary = run_table(db).filter(pl.col("run_id") == str(run_id)).to_dicts()
    return {**(summary[0] if summary else {}), **rows[0]}


@cached(ttl_bucket=10)
def run_history(db: Path, run_id: str) -> pl.DataFrame:
    """Every attempt of the run's sweep cell (the run itself when it has no cell), oldest first: run_id,
    attempt, status (run_status: stale included), status_reason, started_at, ended_at, heartbeat_at."""
    sql = """WITH me AS (SELECT sweep, cell_id FROM runs WHERE run_id = $id)
             SELECT r.run_id, r.name, r.attempt, s.status, r.status_reason, r.started_at, r.ended_at, r.heartbeat_at
             FROM runs r JOIN run_status s USING (run_id), me
             WHERE r.run_id = $id OR (me.cell_id IS NOT NULL AND r.cell_id = me.cell_id
                                      AND r.sweep IS NOT DISTINCT FROM me.sweep)
             ORDER BY r.attempt NULLS FIRST, r.started_at"""
    with connect(db) as con:
        return read_frame(con, sql, {"id": str(run_id)})


@cached(ttl_bucket=10)
def run_scalars(db: Path, run_id: str) -> pl.DataFrame:
    """One row per scalar name the run logged: how many values, first/last step, last, min and max."""
    sql = """SELECT name, count(*) AS n, min(step) AS first_step, max(step) AS last_step,
                    arg_max(value, step) AS last, min(value) AS min, max(value) AS max
             FROM scalars WHERE run_id = $id GROUP BY name ORDER BY name"""
    with connect(db) as con:
        return read_frame(con, sql, {"id": str(run_id)})


@cached()
def run_configs(db: Path, run_ids: Sequence[str]) -> dict[str, dict]:
    """Per run: its config JSON (text) and the run columns grouping falls back on (dashboard.grouping)."""
    sql = """SELECT run_id, config, task, model, optimizer, lr, momentum, weight_decay, batch_size, accum_steps,
                    train_size, seed, sweep FROM runs WHERE run_id IN (SELECT unnest($ids))"""
    with connect(db) as con:
        rows = read_frame(con, sql, {"ids": _ids(run_ids) or [""]}).to_dicts()
    return {r["run_id"]: r for r in rows}


# --- pages-b ---


@cached()
def final_scalar(db: Path, run_ids: Sequence[str], name: str) -> pl.DataFrame:
    """The last finite value of the scalar `name` per run (e.g. `sharpness` at the last evaluation):
    run_id, step, value; runs that never logged it have no row."""
    return _macro("final_scalar", db, run_ids,
                  "SELECT run_id, max(step) AS step, arg_max(value, step) AS value FROM scalars "
                  "WHERE name = $name AND isfinite(value) AND run_id IN (SELECT unnest($ids)) "
                  "GROUP BY run_id ORDER BY run_id", {"name": str(name)})


PROVENANCE_COLUMNS = ("host", "rank", "world_size", "launcher", "job_id", "array_job_id", "array_task_id",
                      "attempt", "cell_id", "git_commit")


@cached()
def run_provenance(db: Path) -> pl.DataFrame:
    """Where each run ran (collector/provenance.py): run_id and the PROVENANCE_COLUMNS the store has
    (a store written before they existed simply lacks some)."""
    with connect(db) as con:
        have = {r[0] for r in con.sql(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'").fetchall()}
        cols = ", ".join(["run_id", *(c for c in PROVENANCE_COLUMNS if c in have)])
        return read_frame(con, f"SELECT {cols} FROM runs")
