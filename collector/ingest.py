"""Move spooled rows into DuckDB: one short, idempotent transaction per spool.

A possible replay goes in with INSERT OR IGNORE against the primary keys, so a segment replayed after
a crash between COMMIT and its removal never duplicates anything. Segments leave the spool (deleted, or
kept under ingested/ by a live run) only after COMMIT.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from collector.spool import INGESTED, Segment, Spool, quarantine
from collector.values import STEP_KINDS, clean_run_row, kinds
from schema import evals, refresh_run_stats, runs, scalars

RUN_COLUMNS = tuple(c.name for c in runs.columns if c.name != "heartbeat_at")
# What a spool segment of each table may hold (the table's columns without run_id).
SEGMENT_COLUMNS = {"steps": frozenset(STEP_KINDS), "evals": frozenset(kinds(evals)),
                   "scalars": frozenset(kinds(scalars))}
# Errors that belong to the rows being inserted (a value the column cannot take), not to the store.
DATA_ERRORS = (duckdb.DataError, duckdb.IntegrityError, duckdb.BinderException)
_NOTED: set = set()  # runs whose unstorable run fields were reported (once per process)


def upsert_run(con: duckdb.DuckDBPyConnection, row: dict, alive: bool = True) -> None:
    """Insert the run row, or refresh its mutable fields.

    heartbeat_at becomes now() when the writing process is alive; a recovered dead run keeps its last one.
    """
    row, notes = clean_run_row(row)
    if notes and row.get("run_id") not in _NOTED:
        _NOTED.add(row.get("run_id"))
        print(f"batchscope: run {row.get('run_id')}: stored NULL for run fields the store cannot take: "
              + "; ".join(notes), file=sys.stderr, flush=True)
    values = {c: row.get(c) for c in RUN_COLUMNS}
    if isinstance(values["config"], (dict, list)):
        values["config"] = json.dumps(values["config"], default=str)
    cols = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    con.execute(
        f"INSERT INTO runs ({cols}, heartbeat_at) VALUES ({marks}, {'now()' if alive else 'CAST(? AS TIMESTAMPTZ)'}) "
        "ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, ended_at = excluded.ended_at, "
        "status_reason = excluded.status_reason, "
        f"heartbeat_at = {'excluded.heartbeat_at' if alive else 'runs.heartbeat_at'}",
        list(values.values()) + ([] if alive else [row.get("heartbeat_at") or row.get("started_at")]),
    )


# Which live runs' rows need writing: absent from the store or changed (status, reason, end), or with
# a heartbeat older than HEARTBEAT_FRESH seconds. One query for all runs of a turn.
_RUNS_TO_WRITE = """
SELECT j.run_id,
       r.run_id IS NULL OR r.status IS DISTINCT FROM j.status OR r.status_reason IS DISTINCT FROM j.status_reason
           OR r.ended_at IS DISTINCT FROM j.ended_at AS changed,
       r.heartbeat_at IS NULL OR r.heartbeat_at < now() - to_seconds(?) AS beat
FROM (SELECT unnest(?::VARCHAR[]) AS run_id, unnest(?::VARCHAR[]) AS status, unnest(?::VARCHAR[]) AS status_reason,
             unnest(?::VARCHAR[])::TIMESTAMPTZ AS ended_at) j
LEFT JOIN runs r USING (run_id)
"""
HEARTBEAT_FRESH = 5.0  # seconds; a live run's heartbeat_at is rewritten only when older (60 s means stale)


def sync_runs(con: duckdb.DuckDBPyConnection, rows: list[dict]) -> None:
    """The run rows of live runs, inside the caller's transaction, at the cost of one query when nothing
    changed: rows new or changed go in through upsert_run, the others only get their heartbeat refreshed
    (one UPDATE for all) when it is older than HEARTBEAT_FRESH s. Before, every turn upserted every live
    run's row (~10 ms each with DuckDB's ON CONFLICT DO UPDATE: most of a turn of 8 runs)."""
    if not rows:
        return
    by_id = {row["run_id"]: row for row in rows}
    cols = [[r.get(c) for r in by_id.values()] for c in ("run_id", "status", "status_reason", "ended_at")]
    beat = []
    for run_id, changed, due in con.execute(_RUNS_TO_WRITE, [HEARTBEAT_FRESH, *cols]).fetchall():
        if changed:
            upsert_run(con, by_id[run_id], alive=True)
        elif due:
            beat.append(run_id)
    if beat:
        con.execute("UPDATE runs SET heartbeat_at = now() WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [beat])


def _unregister(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Drop a registered Arrow view; inside a failed transaction DuckDB refuses, and the error that failed
    it is the one to report (the view dies with the short-lived connection or is replaced)."""
    with contextlib.suppress(duckdb.TransactionException):
        con.unregister(name)


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, data: pa.Table, run_id: str | None = None,
                ignore_existing: bool = True) -> None:
    """Bulk insert through DuckDB's Arrow scan, matching columns by name.

    With `run_id`, the rows get that run_id (spool segments leave it out: the folder says whose they are).
    With `ignore_existing`, rows whose key is already stored are skipped (replays are harmless).
    """
    if run_id is not None and "run_id" in data.column_names:
        data = data.drop_columns(["run_id"])
    con.register("_batch", data)
    try:
        select = "SELECT ?::VARCHAR AS run_id, * FROM _batch" if run_id is not None else "SELECT * FROM _batch"
        verb = "INSERT OR IGNORE" if ignore_existing else "INSERT"
        con.execute(f"{verb} INTO {table} BY NAME {select}", [run_id] if run_id is not None else [])
    finally:
        _unregister(con, "_batch")


# Merge a batch's per-run figures into the run_stats cache. Every figure but n_steps is a max/min/or,
# so merging is exact for any batch; n_steps adds up only when every row of the batch was new. final_loss
# is the loss of the last step that has one (arg_max skips NULLs): a batch of steps without a loss (a DDP
# run's unreduced last block) keeps the cached one, and a cached NULL takes any batch's.
_MERGE_RUN_STATS = """
INSERT INTO run_stats SELECT * FROM run_stats_of('_stats_batch')
ON CONFLICT (run_id) DO UPDATE SET
    n_steps = run_stats.n_steps + excluded.n_steps,
    final_loss = CASE WHEN excluded.final_loss IS NOT NULL AND (run_stats.final_loss IS NULL
                           OR run_stats.steps IS NULL OR excluded.steps >= run_stats.steps)
                      THEN excluded.final_loss ELSE run_stats.final_loss END,
    steps = greatest(run_stats.steps, excluded.steps),
    examples = greatest(run_stats.examples, excluded.examples),
    wall_time = greatest(run_stats.wall_time, excluded.wall_time),
    best_loss = least(run_stats.best_loss, excluded.best_loss),
    has_nonfinite_loss = run_stats.has_nonfinite_loss OR excluded.has_nonfinite_loss
"""
_STATS_COLUMNS = {"examples": pa.int64(), "wall_time": pa.float64(), "loss": pa.float64()}


def update_run_stats(con: duckdb.DuckDBPyConnection, run_id: str | None, data: pa.Table, all_new: bool) -> None:
    """Keep run_stats in step with the rows just inserted into `steps` (same transaction).

    `all_new`: every row of `data` was inserted (a plain INSERT); otherwise (a replay, some rows were
    already there) the run's figures are recomputed from `steps`, which is exact either way.
    `run_id=None`: `data` has a run_id column (several runs at once; all_new only).
    """
    if not all_new:
        con.execute("DELETE FROM run_stats WHERE run_id = ?", [run_id])
        refresh_run_stats(con)  # recomputes the runs missing from the cache, this one included
        return
    for name, type_ in _STATS_COLUMNS.items():  # a user's loop may not log every column
        if name not in data.column_names:
            data = data.append_column(name, pa.nulls(data.num_rows, type_))
    batch = data.select(["step", *_STATS_COLUMNS])
    batch = batch.append_column("run_id", data.column("run_id") if run_id is None
                                else pa.repeat(pa.scalar(run_id), data.num_rows))
    con.register("_stats_batch", batch)
    try:
        con.execute(_MERGE_RUN_STATS)
    finally:
        _unregister(con, "_stats_batch")


def _stored_in_range(con: duckdb.DuckDBPyConnection, table: str, run_id: str, data: pa.Table) -> bool:
    """Whether any stored row of this run falls in the batch's step range (then it may be a replay)."""
    steps = data.column("step")
    lo, hi = pa.compute.min(steps).as_py(), pa.compute.max(steps).as_py()
    return con.execute(f"SELECT count(*) FROM {table} WHERE run_id = ? AND step BETWEEN ? AND ?",
                       [run_id, lo, hi]).fetchall()[0][0] > 0


def _write_tables(con: duckdb.DuckDBPyConnection, run: dict, tables: dict[str, pa.Table], alive: bool,
                  careful: bool) -> None:
    """The run row and its rows, inside the caller's transaction."""
    upsert_run(con, run, alive=alive)
    for table, data in tables.items():
        # Fresh rows (the usual case) take the plain bulk INSERT; a possible replay takes INSERT OR IGNORE.
        ignore = careful or _stored_in_range(con, table, run["run_id"], data)
        insert_rows(con, table, data, run_id=run["run_id"], ignore_existing=ignore)
        if table == "steps":
            update_run_stats(con, run["run_id"], data, all_new=not ignore)


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection):
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        # After an I/O error (a full disk) DuckDB may have ended the transaction itself; its "cannot
        # rollback" would hide the real cause, which is the error raised here.
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise


def _ingest_tables(con: duckdb.DuckDBPyConnection, run: dict, tables: dict[str, pa.Table], alive: bool,
                   careful: bool) -> None:
    with _transaction(con):
        _write_tables(con, run, tables, alive, careful)


def read_segment(seg: Segment, quarantined: list[str] | None = None) -> pa.Table | None:
    """A segment's rows; None if it is gone (ingested meanwhile) or unreadable (then quarantined, and its
    new path appended to `quarantined`)."""
    try:
        data = seg.read()
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError, ValueError) as exc:  # truncated, garbled, zero bytes
        _quarantine_segment(seg, f"not a readable Arrow segment: {' '.join(str(exc).split())[:200]}", quarantined)
        return None
    if "run_id" in data.column_names:
        data = data.drop_columns(["run_id"])
    unknown = set(data.column_names) - SEGMENT_COLUMNS[seg.table]
    if unknown or "step" not in data.column_names:
        why = f"unknown columns {sorted(unknown)}" if unknown else "no step column"
        _quarantine_segment(seg, f"not a {seg.table} segment: {why}", quarantined)
        return None
    return data


def _quarantine_segment(seg: Segment, reason: str, quarantined: list[str] | None) -> None:
    spool_dir = seg.path.parent.parent if seg.path.parent.name == INGESTED else seg.path.parent
    with contextlib.suppress(FileNotFoundError):
        dest = quarantine(spool_dir.parent, seg.path, reason, run_id=spool_dir.name)
        if quarantined is not None:
            quarantined.append(str(dest))


def read_segments(segments: list[Segment]) -> dict[str, pa.Table]:
    """The segments' rows as one table per store table (segments removed meanwhile are skipped,
    unreadable ones quarantined)."""
    by_table: dict[str, list[pa.Table]] = {}
    for seg in segments:
        data = read_segment(seg)
        if data is not None:
            by_table.setdefault(seg.table, []).append(data)
    return {t: pa.concat_tables(parts, promote_options="default") for t, parts in by_table.items()}


@dataclass
class Job:
    """One spool to ingest, as prepared (its run row and readable segments) before the transaction."""

    spool: Spool
    run: dict
    parts: list[tuple[Segment, pa.Table]]
    alive: bool
    careful: bool


def prepare(spool: Spool, status_override: str | None = None, replay_ingested: bool = False,
            alive: bool | None = None, quarantined: list[str] | None = None) -> Job | None:
    """Read a spool's run row and segments (quarantining unreadable ones); None if it has no run.json.
    Raises ValueError if run.json is garbled."""
    run = spool.read_run()
    if run is None:
        return None
    run = {**run, "run_id": spool.run_id}
    if status_override:
        run = {**run, "status": status_override}
    segments = spool.segments()
    if replay_ingested:
        segments = spool.segments(ingested=True) + segments
    parts = [(seg, read_segment(seg, quarantined)) for seg in segments]
    return Job(spool, run, [(seg, data) for seg, data in parts if data is not None],
               status_override != "stale" if alive is None else alive, replay_ingested)


def ingest_jobs(con: duckdb.DuckDBPyConnection, jobs: list[Job], quarantined: list[str] | None = None) -> int:
    """Several spools in ONE transaction (one commit for a whole ingest turn); if the store refuses
    any row, each spool again on its own, where the refused segments are found and quarantined."""
    try:
        with _transaction(con):
            fresh = [job for job in jobs if not job.careful]
            for job in jobs:
                if job.careful:  # a replay (recovery): INSERT OR IGNORE, run by run
                    _write_tables(con, job.run, _by_table(job.parts), job.alive, careful=True)
            sync_runs(con, [job.run for job in fresh])
            _insert_fresh(con, fresh)
    except (*DATA_ERRORS, duckdb.ConstraintException):
        return sum(_ingest_job(con, job, quarantined) for job in jobs)
    for job in jobs:
        job.spool.mark_ingested([seg for seg, _ in job.parts])
    return sum(data.num_rows for job in jobs for _, data in job.parts)


def _insert_fresh(con: duckdb.DuckDBPyConnection, jobs: list[Job]) -> None:
    """Live runs' new segments: one plain INSERT per table for all runs, and one run_stats merge. They
    were never ingested (segments leave the top level only after COMMIT); if some were after all (a
    crash between COMMIT and the move), the primary key refuses the INSERT and the caller falls back
    to the careful path, run by run."""
    by_table: dict[str, list[pa.Table]] = {}
    for job in jobs:
        for table, data in _by_table(job.parts).items():
            by_table.setdefault(table, []).append(
                data.append_column("run_id", pa.repeat(pa.scalar(job.spool.run_id), data.num_rows)))
    for table, parts in by_table.items():
        data = pa.concat_tables(parts, promote_options="default")
        insert_rows(con, table, data, ignore_existing=False)
        if table == "steps":
            update_run_stats(con, None, data, all_new=True)


def _ingest_job(con: duckdb.DuckDBPyConnection, job: Job, quarantined: list[str] | None) -> int:
    tables, parts = _by_table(job.parts), job.parts
    try:
        try:
            _ingest_tables(con, job.run, tables, job.alive, careful=job.careful)
        except duckdb.ConstraintException:  # the same step logged twice within the batch: keep the first
            _ingest_tables(con, job.run, tables, job.alive, careful=True)
    except DATA_ERRORS:
        parts = _ingest_one_by_one(con, job.run, parts, job.alive, quarantined)
    job.spool.mark_ingested([seg for seg, _ in parts])
    return sum(data.num_rows for _, data in parts)


def ingest_spool(con: duckdb.DuckDBPyConnection, spool: Spool, status_override: str | None = None,
                 replay_ingested: bool = False, alive: bool | None = None,
                 quarantined: list[str] | None = None) -> int:
    """Ingest everything in one spool within one transaction; returns the number of rows moved.

    `replay_ingested` also re-inserts the segments kept after earlier ingests (INSERT OR IGNORE), which
    puts back whatever the store lost of them. A segment whose rows the store refuses (a value out of
    range, written by an older release) is quarantined and the rest go in.
    """
    job = prepare(spool, status_override, replay_ingested, alive, quarantined)
    return 0 if job is None else _ingest_job(con, job, quarantined)


def _by_table(parts: list[tuple[Segment, pa.Table]]) -> dict[str, pa.Table]:
    by_table: dict[str, list[pa.Table]] = {}
    for seg, data in parts:
        by_table.setdefault(seg.table, []).append(data)
    return {t: pa.concat_tables(p, promote_options="default") for t, p in by_table.items()}


def _ingest_one_by_one(con, run: dict, parts: list[tuple[Segment, pa.Table]], alive: bool,
                       quarantined: list[str] | None) -> list:
    """Each segment in its own transaction; those the store refuses are quarantined. Returns the rest."""
    _ingest_tables(con, run, {}, alive, careful=True)  # the run row alone (cleaned: it cannot fail on values)
    good = []
    for seg, data in parts:
        try:
            _ingest_tables(con, run, {seg.table: data}, alive, careful=True)
            good.append((seg, data))
        except DATA_ERRORS as exc:
            _quarantine_segment(seg, f"the store refused its rows: {' '.join(str(exc).split())[:200]}", quarantined)
    return good


# Primary key of each data table besides run_id: what makes a logged row distinct.
_KEYS = {"steps": ["step"], "evals": ["step", "split"], "scalars": ["step", "name"]}


def missing_keys(con: duckdb.DuckDBPyConnection, run_id: str, tables: dict[str, pa.Table]) -> dict[str, int]:
    """Per table, how many distinct keys of these spooled rows of `run_id` the store lacks ({} if none).
    Exact whatever was logged twice: it asks for each key, not for a count."""
    out = {}
    for table, data in tables.items():
        keys = _KEYS[table]
        on = " AND ".join(f"s.{k} = k.{k}" for k in keys)
        con.register("_kept", data.select(keys))
        try:
            n = con.execute(f"SELECT count(*) FROM (SELECT DISTINCT {', '.join(keys)} FROM _kept) k WHERE NOT EXISTS "
                            f"(SELECT 1 FROM {table} s WHERE s.run_id = ? AND {on})", [run_id]).fetchall()[0][0]
        finally:
            _unregister(con, "_kept")
        if n:
            out[table] = n
    return out


def missing_rows(con: duckdb.DuckDBPyConnection, spool: Spool, status: str) -> dict[str, int]:
    """Per table, how many of the rows this run spooled (and still keeps) the store lacks; {} if none.
    `runs` counts 1 when the run's row is missing or does not have `status`.

    A count per table first (cheap, and exact when it matches); otherwise, or when some kept segments
    were already checked and dropped, each kept key is looked up.
    """
    stored = dict(con.execute(
        "SELECT 'steps', count(*) FROM steps WHERE run_id = $1 UNION ALL "
        "SELECT 'evals', count(*) FROM evals WHERE run_id = $1 UNION ALL "
        "SELECT 'scalars', count(*) FROM scalars WHERE run_id = $1", [spool.run_id]).fetchall())
    row = con.execute("SELECT status FROM runs WHERE run_id = ?", [spool.run_id]).fetchall()
    out = {} if row == [(status,)] else {"runs": 1}
    if not spool.pruned and all(stored[t] >= n for t, n in spool.rows_written.items()):
        return out
    kept = read_segments(spool.segments(ingested=True) + spool.segments())
    out |= missing_keys(con, spool.run_id, kept)
    for t, written in spool.rows_written.items():
        # Rows written to segments that are no longer there (quarantined as unreadable) and not found
        # by count: they cannot be looked up, so they count as missing as far as the count says.
        gone = written - spool.rows_dropped[t] - (kept[t].num_rows if t in kept else 0)
        if gone > 0 and stored[t] < written:
            out[t] = out.get(t, 0) + min(gone, written - stored[t])
    return out


def recover_spools(db: Path, wait: float = 0.0) -> int:
    """Move every spool into the store (collector.ingester.ingest_all) and return how many spools of
    dead processes (killed, crashed, or finished while the store was busy) were recovered; a run still
    marked `running` in a dead spool becomes `stale`. 0 if another process holds the ingest lease."""
    from collector.ingester import ingest_all

    summary = ingest_all(db, wait=wait)
    return summary.recovered if summary is not None else 0
