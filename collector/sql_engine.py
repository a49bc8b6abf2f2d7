"""The one SQL engine behind `collector sql`, `collector shell` and the dashboard's SQL console.

A query here is read-only and bounded, whoever sends it:

- **rules checked before anything runs** (the text is parsed by DuckDB, so comments and casing do not
  fool them): one statement; SELECT-like statements only (SELECT, WITH, FROM-first, VALUES, DESCRIBE,
  SHOW, SUMMARIZE, PIVOT; EXPLAIN of those); INSTALL/LOAD, COPY/ATTACH/EXPORT and SET/PRAGMA are refused,
  never attempted. Each refusal names its rule.
- **a connection that cannot reach out**: read-only, `enable_external_access=false` (no read_csv, glob,
  read_parquet, replacement scans of file names, HTTP), no extension autoload/autoinstall, no scans of
  Python variables, and `lock_configuration=true` so no statement can undo any of it. Only an explicit
  `allow_files` (the CLI's --allow-files) turns file access on.
- **limits**: rows (a LIMIT pushed into the plan), time (an interrupt at the deadline), memory (DuckDB's
  memory_limit, and the query process's RSS: see collector.sql_worker), the size of the response (Arrow
  batches are fetched one at a time and fetching stops at the byte limit) and the length of one text cell.

`execute` is the in-process part; `collector.sql_worker.run_sql` runs it in a separate process so that
no query can grow or stall the caller (the dashboard server, the CLI).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass, replace

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

MB = 1 << 20

# Statement types DuckDB reports for the SELECT family (DESCRIBE/SHOW/SUMMARIZE/PIVOT parse as SELECT).
READ_STATEMENTS = {"SELECT"}
RULE_FOR_STATEMENT = {
    "LOAD": "no-extensions",  # INSTALL and LOAD
    "EXTENSION": "no-extensions",
    "COPY": "no-files",
    "COPY_DATABASE": "no-files",
    "ATTACH": "no-files",
    "DETACH": "no-files",
    "EXPORT": "no-files",
    "SET": "no-settings",
    "VARIABLE_SET": "no-settings",
    "PRAGMA": "no-settings",
    "RESET": "no-settings",
}
RULES = {
    "one-statement": "one statement at a time",
    "read-only": "only queries (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN); the store is never written",
    "no-extensions": "INSTALL and LOAD are refused and never attempted",
    "no-files": "no file or network access (COPY, ATTACH, EXPORT, read_csv, glob, read_parquet, 'file' scans)",
    "no-settings": "SET and PRAGMA are refused: the limits cannot be changed from SQL",
    "row-limit": "at most max_rows rows are returned",
    "time-limit": "a query is stopped at its deadline",
    "memory-limit": "a query is stopped when its process passes the memory limit",
    "size-limit": "fetching stops when the response reaches its size limit",
    "cell-limit": "text cells longer than the cell limit are cut",
}


@dataclass(frozen=True)
class Limits:
    """What one query may use. The defaults are the dashboard console's; CLI_LIMITS are the CLI's."""

    max_rows: int = 5_000
    timeout_s: float = 10.0
    memory_mb: int = 1024  # RSS of the query process; DuckDB's own memory_limit is half of it
    max_response_mb: float = 16.0  # Arrow bytes handed back
    max_cell_chars: int = 10_000  # per text/blob cell
    allow_files: bool = False
    threads: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Limits:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def describe(self) -> str:
        files = "file access allowed" if self.allow_files else "no files or network"
        return (f"{self.max_rows:,} rows, {self.timeout_s:g} s, {self.memory_mb:,} MB memory, "
                f"{self.max_response_mb:g} MB response, {self.max_cell_chars:,} characters per cell, {files}")


CONSOLE_LIMITS = Limits()
CLI_LIMITS = Limits(max_rows=1_000_000, timeout_s=60.0, memory_mb=2048, max_response_mb=512.0,
                    max_cell_chars=1_000_000)


@dataclass
class SqlResult:
    """The outcome of one query; failure is data (ok=False, message, the rule that refused it)."""

    ok: bool
    message: str
    table: pa.Table | None = None
    rule: str | None = None  # the rule that refused, stopped or cut the query
    truncated: bool = False
    elapsed_s: float = 0.0

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names) if self.table is not None else []


def duckdb_config(limits: Limits) -> dict:
    """The connection configuration that enforces `limits` (locked: no statement can change it)."""
    return {
        "enable_external_access": bool(limits.allow_files),
        "python_enable_replacements": False,  # `FROM some_variable` must not read the caller's Python objects
        "allow_community_extensions": False,
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
        "memory_limit": f"{max(64, limits.memory_mb // 2)}MB",
        "max_temp_directory_size": f"{max(64, limits.memory_mb * 2)}MB",
        "threads": max(1, int(limits.threads)),
        "lock_configuration": True,
    }


def refusal(rule: str, detail: str) -> SqlResult:
    return SqlResult(False, f"Refused (rule {rule}): {detail}", rule=rule)


_PARSER: duckdb.DuckDBPyConnection | None = None
_PARSER_LOCK = threading.Lock()


def _statements(text: str) -> list:
    """DuckDB's parse of `text` into statements (one shared in-memory connection: opening one costs
    tens of ms, parsing a few µs)."""
    global _PARSER
    with _PARSER_LOCK:
        if _PARSER is None:
            _PARSER = duckdb.connect(":memory:")
        return _PARSER.extract_statements(text)


_EXPLAIN_PREFIX = re.compile(r"(?is)^\s*explain\s+(analy[sz]e\s+)?(\([^)]*\)\s*)?")


def check_sql(sql: str) -> SqlResult | None:
    """Why `sql` may not run (a refusal naming its rule), or None if it may. Nothing is executed."""
    text = (sql or "").strip()
    if not text:
        return SqlResult(False, "Enter a query.", rule="read-only")
    try:
        statements = _statements(text)
    except duckdb.Error as exc:
        return SqlResult(False, clean_error(exc))
    if len(statements) != 1:
        return refusal("one-statement", f"run one statement at a time ({len(statements)} given).")
    stmt = statements[0]
    kind = _kind(stmt)
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: check that one too
        try:
            inner = _statements(_EXPLAIN_PREFIX.sub("", stmt.query, count=1))
            kind = _kind(inner[0]) if len(inner) == 1 else "EXPLAIN"
        except duckdb.Error:
            kind = "EXPLAIN"
    if kind in READ_STATEMENTS:
        return None
    rule = RULE_FOR_STATEMENT.get(kind, "read-only")
    name = "INSTALL/LOAD" if rule == "no-extensions" else kind
    return refusal(rule, f"{name} statements are not allowed: {RULES[rule]}.")


def _kind(stmt) -> str:
    """The statement's type name; one this duckdb module cannot name (e.g. UPDATE EXTENSIONS) is refused."""
    try:
        return stmt.type.name
    except ValueError:
        return "UNKNOWN"


def clean_error(exc: BaseException) -> str:
    """DuckDB's message as DuckDB wrote it (several lines, with the caret under the error), no traceback."""
    lines = [ln.rstrip() for ln in str(exc).strip().splitlines()]
    lines = [ln for ln in lines if ln.strip()][:12]
    return "\n".join(lines) if lines else type(exc).__name__


def explain_error(exc: BaseException, limits: Limits) -> SqlResult:
    """A DuckDB error as a result; file-access refusals from DuckDB name the no-files rule."""
    msg = clean_error(exc)
    if isinstance(exc, duckdb.PermissionException) or "disabled by configuration" in msg:
        return SqlResult(False, f"Refused (rule no-files): file and network access is disabled here "
                                f"(collector sql --allow-files lifts it).\n{msg}", rule="no-files")
    if isinstance(exc, duckdb.OutOfMemoryException):
        return SqlResult(False, f"Query stopped (rule memory-limit): it needed more than DuckDB's "
                                f"{max(64, limits.memory_mb // 2):,} MB.\n{msg}", rule="memory-limit")
    m = re.search(r"Table with name (\S+) does not exist", msg)
    if m and not limits.allow_files and re.search(r"[/\\]|\.\w{1,8}$", m.group(1)):
        return SqlResult(False, f"Refused (rule no-files): {m.group(1)} reads as a file name, and file "
                                f"access is disabled here.\n{msg}", rule="no-files")
    return SqlResult(False, msg)


def _cap_cells(batch: pa.RecordBatch, max_chars: int) -> tuple[pa.RecordBatch, bool]:
    """Cut text and blob cells longer than `max_chars`; whether any was cut."""
    cut = False
    arrays = []
    for arr in batch.columns:
        t = arr.type
        is_text = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
        is_blob = pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
        if (is_text or is_blob) and len(arr):
            lengths = pc.utf8_length(arr) if is_text else pc.binary_length(arr)
            longest = pc.max(lengths).as_py()
            if longest is not None and longest > max_chars:
                arr = (pc.utf8_slice_codeunits(arr, 0, max_chars) if is_text
                       else pc.binary_slice(arr, 0, max_chars))
                cut = True
        arrays.append(arr)
    return (pa.RecordBatch.from_arrays(arrays, schema=batch.schema) if cut else batch), cut


def _rows_that_fit(batch: pa.RecordBatch, budget: int) -> int:
    """The most leading rows of `batch` whose Arrow size is within `budget` bytes (binary search)."""
    lo, hi = 0, batch.num_rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if batch.slice(0, mid).nbytes <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fetch_bounded(rel: duckdb.DuckDBPyRelation, limits: Limits) -> tuple[pa.Table, list[str]]:
    """The relation's rows, fetched batch by batch, within the row, cell and size limits; and which
    limits cut it (row-limit, cell-limit, size-limit)."""
    budget = int(limits.max_response_mb * MB)
    reader = rel.limit(limits.max_rows + 1).to_arrow_reader(1024)
    batches: list[pa.RecordBatch] = []
    rows = used = 0
    cuts: list[str] = []
    for batch in reader:
        batch, cut = _cap_cells(batch, limits.max_cell_chars)
        if cut and "cell-limit" not in cuts:
            cuts.append("cell-limit")
        if rows + batch.num_rows > limits.max_rows:
            batch = batch.slice(0, limits.max_rows - rows)
            cuts.append("row-limit")
        size = batch.nbytes
        if used + size > budget:
            keep = _rows_that_fit(batch, budget - used)
            batches.append(batch.slice(0, keep))
            rows += keep
            cuts.append("size-limit")
            break
        batches.append(batch)
        rows += batch.num_rows
        used += size
        if "row-limit" in cuts:
            break
    return pa.Table.from_batches(batches, schema=reader.schema), cuts


def _summary(table: pa.Table, cuts: list[str], limits: Limits, elapsed: float) -> str:
    n = table.num_rows
    msg = f"{n:,} row{'s' if n != 1 else ''} in {elapsed * 1000:.0f} ms"
    notes = []
    if "row-limit" in cuts:
        notes.append(f"stopped at the {limits.max_rows:,}-row limit: rule row-limit")
    if "size-limit" in cuts:
        notes.append(f"truncated at {n:,} rows: the response reached the {limits.max_response_mb:g} MB "
                     f"size limit: rule size-limit")
    if "cell-limit" in cuts:
        notes.append(f"text cells cut at {limits.max_cell_chars:,} characters: rule cell-limit")
    return msg + (" (" + "; ".join(notes) + ")" if notes else "")


def execute(con: duckdb.DuckDBPyConnection, sql: str, limits: Limits) -> SqlResult:
    """Check and run one query on `con` (opened with duckdb_config(limits)); never raises."""
    t0 = time.perf_counter()
    why = check_sql(sql)
    if why is not None:
        return why
    interrupted = threading.Event()

    def _interrupt() -> None:
        interrupted.set()
        con.interrupt()

    timer = threading.Timer(limits.timeout_s, _interrupt)
    timer.daemon = True
    timer.start()
    try:
        rel = con.sql(sql.strip().rstrip(";"))
        if rel is None:
            return SqlResult(False, "The statement returned no result.")
        table, cuts = fetch_bounded(rel, limits)
    except (duckdb.InterruptException, duckdb.Error) as exc:
        if interrupted.is_set() or isinstance(exc, duckdb.InterruptException):
            return stopped_for_time(limits, time.perf_counter() - t0)
        res = explain_error(exc, limits)
        res.elapsed_s = time.perf_counter() - t0
        return res
    except Exception as exc:  # noqa: BLE001 - callers show messages, never tracebacks
        return SqlResult(False, f"{type(exc).__name__}: {exc}", elapsed_s=time.perf_counter() - t0)
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - t0
    return SqlResult(True, _summary(table, cuts, limits, elapsed), table=table, rule=cuts[0] if cuts else None,
                     truncated=bool(cuts), elapsed_s=elapsed)


def stopped_for_time(limits: Limits, elapsed: float) -> SqlResult:
    return SqlResult(False, f"Query stopped (rule time-limit): it ran over the {limits.timeout_s:g} s time limit.",
                     rule="time-limit", elapsed_s=elapsed)


def stopped_for_memory(limits: Limits, elapsed: float) -> SqlResult:
    return SqlResult(False, f"Query stopped (rule memory-limit): its process passed the {limits.memory_mb:,} MB "
                            f"memory limit. Select fewer or smaller values (e.g. left(col, 1000), LIMIT).",
                     rule="memory-limit", elapsed_s=elapsed)


def with_overrides(base: Limits, **overrides) -> Limits:
    """`base` with the given limits replaced (None leaves one as it is)."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def csv_text(frame) -> str:
    """A polars frame as CSV that spreadsheets and pandas read as typed: no byte-order mark, numbers
    unquoted, text quoted only where it must be (a comma, quote or newline), nested values as JSON."""
    import json

    import polars as pl

    def _as_text(value) -> str:
        return json.dumps(value.to_list() if isinstance(value, pl.Series) else value, default=str)

    nested = [c for c, t in zip(frame.columns, frame.dtypes, strict=True) if t.is_nested() or t == pl.Object]
    if nested:
        frame = frame.with_columns([pl.col(c).map_elements(_as_text, return_dtype=pl.String) for c in nested])
    return frame.write_csv()
