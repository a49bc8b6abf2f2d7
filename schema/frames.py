"""The store's views and macros over frames: how the Python API computes a derived quantity without a store.

Every derived number (B_simple over training and at a target, the smoothed loss, steps to target, best
LR per batch, B_crit's inputs) is defined once, in schema/sql/. A notebook holding polars/pandas frames
shaped like the store's tables gets the same numbers by running those same macros over its frames in an
in-memory DuckDB: `evaluate("SELECT * FROM crossings($t)", {"t": [0.3]}, steps=steps, runs=runs)`.
"""

from __future__ import annotations

import threading
from typing import Any

import duckdb
import polars as pl

from schema.migrations import ensure_schema
from schema.tables import DATA_TABLES, DERIVED_TABLES

_LOCK = threading.Lock()
_CON: duckdb.DuckDBPyConnection | None = None
_TABLES = {t.name: [c.name for c in t.columns] for t in (*DATA_TABLES, *DERIVED_TABLES)}
_FILLED: set[str] = set()  # tables of the in-memory store holding rows from the last call


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Any) -> None:
    """Append an Arrow table (or a polars frame) to a store table, columns matched by name (the others NULL)."""
    con.register("_rows", rows.to_arrow() if isinstance(rows, pl.DataFrame) else rows)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _rows")
    finally:
        con.unregister("_rows")


def _connection() -> duckdb.DuckDBPyConnection:
    """One in-memory store per process (creating the schema costs ~0.1 s), emptied before each use."""
    global _CON
    if _CON is None:
        _CON = duckdb.connect(":memory:")
        ensure_schema(_CON)
    return _CON


def _as_polars(data: Any, what: str) -> pl.DataFrame:
    if isinstance(data, pl.DataFrame):
        return data
    if isinstance(data, pl.LazyFrame):
        return data.collect()
    try:
        return pl.from_pandas(data) if type(data).__module__.startswith("pandas") else pl.DataFrame(data)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise TypeError(f"{what}: cannot make a polars DataFrame from {type(data).__name__}: {exc}") from exc


def _runs_rows(runs: pl.DataFrame | None, others: list[pl.DataFrame]) -> pl.DataFrame | None:
    """The runs table to load: the given one (name/status filled in when absent), else one row per run id."""
    if runs is None:
        ids = [f.select(pl.col("run_id").cast(pl.String)) for f in others if "run_id" in f.columns]
        if not ids:
            return None
        runs = pl.concat(ids).unique(maintain_order=True)
    runs = runs.with_columns(pl.col("run_id").cast(pl.String))
    if "name" not in runs.columns:
        runs = runs.with_columns(name=pl.col("run_id"))
    if "status" not in runs.columns:
        runs = runs.with_columns(status=pl.lit("finished"))
    return runs.with_columns(pl.col("name").fill_null(pl.col("run_id")), pl.col("status").fill_null("finished"))


def evaluate(query: str, params: dict | list | None = None, **tables: Any) -> pl.DataFrame:
    """Run `query` against an in-memory store holding the given frames.

    Keyword frames named runs, steps, evals or scalars fill those tables (columns matched by name, the
    others left NULL; a missing runs frame gets one row per run id seen); any other name is visible to
    the query as a table of that name (e.g. hits= for best_lr_of('hits')).
    """
    frames = {k: _as_polars(v, k) for k, v in tables.items() if v is not None}
    data = {k: v for k, v in frames.items() if k in _TABLES}
    extra = {k: v for k, v in frames.items() if k not in _TABLES}
    runs = _runs_rows(data.get("runs"), [v for k, v in data.items() if k != "runs"])
    if runs is not None:
        data["runs"] = runs
    with _LOCK:
        con = _connection()
        try:
            for name in sorted(_FILLED):
                con.execute(f"DELETE FROM {name}")
            _FILLED.clear()
            for name, frame in data.items():
                cols = [c for c in frame.columns if c in _TABLES[name]]
                if not cols or frame.height == 0:
                    continue
                _FILLED.add(name)
                insert_rows(con, name, frame.select(cols))
            for name, frame in extra.items():
                con.register(name, frame.to_arrow())
            try:
                return con.sql(query, params=params).pl() if params else con.sql(query).pl()
            finally:
                for name in extra:
                    con.unregister(name)
        except duckdb.ConstraintException as exc:
            raise ValueError(f"frames with duplicate keys (one row per run and step): {exc}") from exc
