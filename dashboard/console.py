"""The SQL console's engine: one read-only query at a time, with no file or network access,
bounded in time and rows, and errors as messages rather than tracebacks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import polars as pl

from collector.store import StoreError
from dashboard.store_access import connect, store_version

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
