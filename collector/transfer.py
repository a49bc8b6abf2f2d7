"""Move whole stores in and out as Parquet (one file per table): sample_runs/, backups, sharing.

Parquet outlives DuckDB's file-format changes, so shipped data (sample_runs/) is kept in this form.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from collector.ingest import insert_rows
from collector.store import read_connection, write_connection
from schema import refresh_run_stats

EXPORT_TABLES = ("runs", "steps", "evals", "scalars")


def export_store(db: str | os.PathLike | None, folder: str | os.PathLike, where_sweep: str | None = None) -> dict:
    """Write <folder>/<table>.parquet for each data table; returns rows written per table."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    with read_connection(db) as con:
        for table in EXPORT_TABLES:
            sql = f"SELECT * FROM {table}"
            params: list = []
            if where_sweep is not None:
                sql += " WHERE run_id IN (SELECT run_id FROM runs WHERE sweep = ?)"
                params = [where_sweep]
            data = con.sql(sql + " ORDER BY ALL", params=params or None).to_arrow_table()
            pq.write_table(data, out / f"{table}.parquet", compression="zstd")
            counts[table] = data.num_rows
    return counts


def import_store(db: str | os.PathLike | None, folder: str | os.PathLike) -> dict:
    """Load <folder>/<table>.parquet files into the store; rows already present are kept as they are."""
    src = Path(folder)
    files = {t: src / f"{t}.parquet" for t in EXPORT_TABLES if (src / f"{t}.parquet").exists()}
    if "runs" not in files:
        raise FileNotFoundError(f"{src} has no runs.parquet: not an exported batchscope store")
    counts = {}
    with write_connection(db) as con:
        con.execute("BEGIN TRANSACTION")
        for table, path in files.items():
            before = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            insert_rows(con, table, pq.read_table(path))
            counts[table] = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0] - before
        refresh_run_stats(con)
        con.execute("COMMIT")
    return counts
