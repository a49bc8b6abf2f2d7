"""The SQL console's engine: collector.sql_engine's rules and limits, run in a pool of worker processes
(collector.sql_worker) so that no query can grow or stall the dashboard server; results as polars frames
and errors as messages, never tracebacks."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl

from collector.sql_engine import CONSOLE_LIMITS, Limits, check_sql, csv_text
from collector.sql_worker import WorkerPool
from dashboard.store_access import store_version

LIMITS = CONSOLE_LIMITS
POOL_SIZE = 2  # console queries at once; a third waits for one of them (up to its time limit)

EXAMPLE_QUERIES = {
    "Runs of a sweep, best first": (
        "SELECT name, batch_size, lr, status, steps, round(best_loss, 4) AS best_loss,\n"
        "       round(final_test_accuracy, 4) AS test_acc\nFROM run_summary\nORDER BY best_loss NULLS LAST\nLIMIT 50"
    ),
    "Steps and examples to a target loss": (
        "SELECT r.name, r.batch_size, r.lr, t.reached, round(t.steps) AS steps, round(t.examples) AS examples\n"
        "FROM steps_to_target(0.5) t JOIN runs r USING (run_id)\n"
        "ORDER BY r.batch_size, t.steps NULLS LAST"
    ),
    "B_simple at the end of each run": (
        "SELECT r.name, r.batch_size, arg_max(n.b_simple, n.step) AS b_simple_last\n"
        "FROM noise_scale() n JOIN runs r USING (run_id)\nGROUP BY ALL ORDER BY r.batch_size"
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
    rule: str | None = None


_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def pool() -> WorkerPool:
    """The process's console workers (started on first use; `warm_up` starts one ahead)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = WorkerPool(size=POOL_SIZE)
        return _POOL


def warm_up() -> None:
    """Start a console worker in the background, so the first query does not wait for its imports."""
    pool().prestart()


def run_console(db: Path, sql: str, row_limit: int | None = None, time_limit_s: float | None = None,
                limits: Limits | None = None) -> ConsoleResult:
    """Run one read-only query under the console's limits (LIMITS, or `limits`, with the row and time
    limits overridden when given); never raises."""
    lim = limits or LIMITS
    if row_limit is not None:
        lim = replace(lim, max_rows=row_limit)
    if time_limit_s is not None:
        lim = replace(lim, timeout_s=time_limit_s)
    why = check_sql(sql)
    if why is not None:
        return ConsoleResult(False, why.message, rule=why.rule)
    if store_version(Path(db)) is None:
        return ConsoleResult(False, f"No store at {db}.")
    res = pool().run(Path(db), sql, lim)
    if not res.ok or res.table is None:
        return ConsoleResult(False, res.message, elapsed_s=res.elapsed_s, rule=res.rule)
    frame = pl.from_arrow(res.table)
    assert isinstance(frame, pl.DataFrame)
    return ConsoleResult(True, res.message, frame=frame, truncated=res.truncated, elapsed_s=res.elapsed_s,
                         columns=frame.columns, rule=res.rule)


def to_csv(frame: pl.DataFrame) -> str:
    """The CSV the console exports (collector.sql_engine.csv_text: no BOM, numbers unquoted)."""
    return csv_text(frame)
