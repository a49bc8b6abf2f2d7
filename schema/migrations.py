"""Create a store, or migrate one written by an older release, without losing data.

A new store gets the current tables straight from tables.py. An older store is walked forward one
version at a time by the statements in MIGRATIONS. Views and macros (sql/*.sql) are recreated whenever
their text changes (tracked by a digest in schema_version), so they always match the running release.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import duckdb
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateTable

from schema.tables import DATA_TABLES, DERIVED_TABLES, SCHEMA_VERSION, metadata, schema_version

# duckdb_engine's dialect is PostgreSQL's with DuckDB types added; for these tables both compile to the
# same DDL (a test checks it). We compile with the PostgreSQL one at run time because importing
# duckdb_engine next to torch makes DuckDB's bindings print leak warnings at interpreter exit.
DIALECT = postgresql.dialect()

# The tables of release 0.0 (schema version 1), frozen: used to build the v1 test fixture and as the
# record of what migration 1 -> 2 starts from.
V1_DDL = [
    """CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, sweep VARCHAR,
        status VARCHAR NOT NULL, task VARCHAR, model VARCHAR, optimizer VARCHAR, lr DOUBLE, momentum DOUBLE,
        weight_decay DOUBLE, batch_size INTEGER, micro_batch_size INTEGER, accum_steps INTEGER,
        train_size BIGINT, seed BIGINT, device VARCHAR, host VARCHAR, config JSON,
        started_at TIMESTAMP WITH TIME ZONE, ended_at TIMESTAMP WITH TIME ZONE)""",
    """CREATE TABLE steps (run_id VARCHAR, step BIGINT, examples BIGINT, wall_time DOUBLE,
        batch_size INTEGER, lr DOUBLE, loss DOUBLE, g_small_sq DOUBLE, b_small DOUBLE, g_big_sq DOUBLE,
        b_big DOUBLE, PRIMARY KEY (run_id, step))""",
    """CREATE TABLE evals (run_id VARCHAR, step BIGINT, split VARCHAR, examples BIGINT, loss DOUBLE,
        accuracy DOUBLE, PRIMARY KEY (run_id, step, split))""",
    """CREATE TABLE scalars (run_id VARCHAR, step BIGINT, name VARCHAR, value DOUBLE,
        PRIMARY KEY (run_id, step, name))""",
    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP WITH TIME ZONE)",
]

# MIGRATIONS[v] takes a store from version v - 1 to v.
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE runs ADD COLUMN world_size INTEGER DEFAULT 1",
        "ALTER TABLE runs ADD COLUMN heartbeat_at TIMESTAMP WITH TIME ZONE",
        "UPDATE runs SET heartbeat_at = COALESCE(ended_at, started_at)",
        "ALTER TABLE steps ADD COLUMN b_simple DOUBLE",
        "ALTER TABLE schema_version ADD COLUMN sql_digest VARCHAR",
    ],
    3: [
        """CREATE TABLE run_stats (run_id VARCHAR NOT NULL, n_steps BIGINT, steps BIGINT, examples BIGINT,
            wall_time DOUBLE PRECISION, final_loss DOUBLE PRECISION, best_loss DOUBLE PRECISION,
            has_nonfinite_loss BOOLEAN, PRIMARY KEY (run_id))""",
    ],
    4: [
        "ALTER TABLE runs ADD COLUMN status_reason VARCHAR",
        # provenance of a run (where it ran, which attempt of which sweep cell): collector/provenance.py
        *(f"ALTER TABLE runs ADD COLUMN {c}" for c in (
            "cell_id VARCHAR", "attempt INTEGER", "launcher VARCHAR", "job_id VARCHAR", "array_job_id VARCHAR",
            "array_task_id INTEGER", "rank INTEGER", "git_commit VARCHAR")),
    ],
    5: [  # language-model tasks count progress in tokens (issue 13)
        "ALTER TABLE runs ADD COLUMN tokens_per_step BIGINT",
    ],
}
# Recompute the run_stats cache for runs whose steps were written outside the collector.
REFRESH_RUN_STATS = "INSERT OR REPLACE INTO run_stats SELECT * FROM run_stats_of('uncached_steps')"

# Statements that need the current views and macros, run after them when a store passes version v.
AFTER_VIEWS: dict[int, list[str]] = {
    3: [REFRESH_RUN_STATS],
}
assert max(MIGRATIONS) == SCHEMA_VERSION, "add a migration when SCHEMA_VERSION changes"


def create_table_sql() -> list[str]:
    """DuckDB DDL of the current tables, compiled from the SQLAlchemy declarations."""
    return [str(CreateTable(t).compile(dialect=DIALECT)).strip() for t in metadata.sorted_tables]


def _sql_files() -> list[tuple[str, str]]:
    folder = resources.files("schema") / "sql"
    files = sorted((p.name, p.read_text()) for p in folder.iterdir() if p.name.endswith(".sql"))
    return files


def sql_digest() -> str:
    h = hashlib.sha256()
    for name, text in _sql_files():
        h.update(name.encode() + b"\0" + text.encode())
    return h.hexdigest()[:16]


def store_version(con: duckdb.DuckDBPyConnection) -> tuple[int, str | None]:
    """(schema version, digest of the views/macros applied); (0, None) for an empty database."""
    has = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchall()[0][0]
    if not has:
        return 0, None
    cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'schema_version'").fetchall()}
    digest_col = "sql_digest" if "sql_digest" in cols else "NULL"
    row = con.execute(f"SELECT version, {digest_col} FROM schema_version ORDER BY version DESC LIMIT 1").fetchall()
    return (row[0][0], row[0][1]) if row else (0, None)


def _apply_comments(con: duckdb.DuckDBPyConnection) -> None:
    """Keep DuckDB's catalog comments equal to the data dictionary in tables.py."""
    for table in (*DATA_TABLES, *DERIVED_TABLES, schema_version):
        for col in table.columns:
            doc = (col.comment or "").replace("'", "''")
            con.execute(f"COMMENT ON COLUMN {table.name}.{col.name} IS '{doc}'")


def _apply_views(con: duckdb.DuckDBPyConnection) -> None:
    for _name, text in _sql_files():
        con.execute(text)


def refresh_run_stats(con: duckdb.DuckDBPyConnection) -> None:
    """Bring the run_stats cache in step after writing `steps` directly (bulk loads, imports, tests)."""
    con.execute(REFRESH_RUN_STATS)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> bool:
    """Create or migrate the store behind a read-write connection; True if anything changed."""
    version, digest = store_version(con)
    current_digest = sql_digest()
    if version == SCHEMA_VERSION and digest == current_digest:
        return False
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"this store has schema version {version}, newer than this release understands "
            f"({SCHEMA_VERSION}); upgrade batchscope"
        )
    con.execute("BEGIN TRANSACTION")
    try:
        if version == 0:
            for ddl in create_table_sql():
                con.execute(ddl)
        else:
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS[v]:
                    con.execute(stmt)
        if version < SCHEMA_VERSION:
            _apply_comments(con)
        _apply_views(con)
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for stmt in AFTER_VIEWS.get(v, []) if version > 0 else []:
                con.execute(stmt)
        con.execute(
            "INSERT OR REPLACE INTO schema_version (version, applied_at, sql_digest) VALUES (?, now(), ?)",
            [SCHEMA_VERSION, current_digest],
        )
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return True
