"""`python -m collector shell`: an interactive, read-only SQL prompt on the store.

For when no DuckDB shell of the library's version is installed (the `duckdb` CLI must match the file's
storage version). Statements end with `;` and may span lines; readline gives history (kept in
$BATCHSCOPE_HISTORY, default ~/.batchscope_history) and Tab completes table, view, macro and column
names and SQL keywords. Every statement goes through collector.sql_engine, with the limits of
`collector sql`, in a worker process that does not hold the store between statements.

    .tables            tables, views and macros        .schema NAME   columns of a table or view
    .mode table|csv|json  how results are printed      .limits        the limits in force
    .help              this list                       .quit          leave (or Ctrl-D)
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import polars as pl

from collector.sql_engine import Limits
from collector.sql_worker import WorkerPool

_KEYWORDS = (
    "SELECT FROM WHERE GROUP BY ORDER LIMIT OFFSET HAVING JOIN LEFT RIGHT INNER OUTER FULL CROSS ON USING AS "
    "WITH DISTINCT UNION ALL EXCEPT INTERSECT CASE WHEN THEN ELSE END AND OR NOT NULL IS IN BETWEEN LIKE ILIKE "
    "ASC DESC NULLS FIRST LAST DESCRIBE SUMMARIZE SHOW TABLES EXPLAIN ANALYZE QUALIFY WINDOW OVER PARTITION "
    "FILTER COUNT AVG MIN MAX SUM MEDIAN QUANTILE ARG_MIN ARG_MAX ROUND"
)
KEYWORDS = _KEYWORDS.split()
NAMES_SQL = (
    "SELECT table_name AS name, column_name AS col FROM duckdb_columns() WHERE NOT internal "
    "UNION ALL SELECT function_name, NULL FROM duckdb_functions() "
    "WHERE NOT internal AND function_type IN ('macro', 'table_macro')"
)
DOT_HELP = __doc__[__doc__.index("    .tables"):]


def history_path() -> Path:
    return Path(os.environ.get("BATCHSCOPE_HISTORY") or Path.home() / ".batchscope_history")


class Shell:
    """The prompt's state: the store, the limits, the output mode, and the names to complete."""

    def __init__(self, db: Path, limits: Limits, printer: Callable[[pl.DataFrame, str, object], None],
                 stdin=None, stdout=None) -> None:
        self.db = db
        self.limits = limits
        self.printer = printer
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.mode = "table"
        self.pool = WorkerPool(size=1)
        self.tables: dict[str, list[str]] = {}
        self.macros: list[str] = []
        self.interactive = self.stdin.isatty()
        self._matches: list[str] = []

    # ------------------------------------------------------------------------------------ names

    def load_names(self) -> None:
        """Table, view, column and macro names for completion and .tables (one bounded query)."""
        res = self.pool.run(self.db, NAMES_SQL, replace(self.limits, max_rows=1_000_000))
        if not res.ok or res.table is None:
            return
        self.tables, self.macros = {}, []
        for name, col in zip(res.table.column("name").to_pylist(), res.table.column("col").to_pylist(),
                             strict=True):
            if col is None:
                self.macros.append(name)
            else:
                self.tables.setdefault(name, []).append(col)

    def candidates(self, text: str) -> list[str]:
        """Completions of `text`: names as stored, keywords in the case the user types them."""
        low = text.lower()
        names = set(self.tables) | set(self.macros) | {c for cols in self.tables.values() for c in cols}
        out = sorted(n for n in names if n.lower().startswith(low))
        upper = not text or text[:1].isupper()
        out += [k if upper else k.lower() for k in KEYWORDS if k.lower().startswith(low)]
        return out

    def complete(self, text: str, state: int) -> str | None:
        """readline's completer: state 0 computes the matches, then they are handed out one by one."""
        if state == 0:
            self._matches = self.candidates(text)
        return self._matches[state] if state < len(self._matches) else None

    # ------------------------------------------------------------------------------------ the loop

    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:
            return
        readline.set_completer(self.complete)
        readline.set_completer_delims(" \t\n(),;=<>+-*/.'\"")
        readline.parse_and_bind("tab: complete")
        with contextlib.suppress(OSError):
            readline.read_history_file(history_path())
        readline.set_history_length(1000)

    def _save_history(self) -> None:
        try:
            import readline

            readline.write_history_file(history_path())
        except (ImportError, OSError):
            pass

    def _read(self, prompt: str) -> str | None:
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        line = self.stdin.readline()
        return line.rstrip("\n") if line else None

    def run(self) -> None:
        """Read statements until .quit or end of input; Ctrl-C drops the statement being typed."""
        if self.interactive:
            self._setup_readline()
            print(f"batchscope shell on {self.db} (read-only; {self.limits.describe()}).\n"
                  "End statements with ;  .help for commands, .quit or Ctrl-D to leave.", file=self.stdout)
        self.load_names()
        buffer: list[str] = []
        try:
            while True:
                try:
                    line = self._read("batchscope> " if not buffer else "       ...> ")
                except KeyboardInterrupt:
                    print(file=self.stdout)
                    buffer = []
                    continue
                if line is None:
                    break
                if not buffer and line.strip().startswith("."):
                    if not self.dot(line.strip()):
                        break
                    continue
                if not line.strip() and not buffer:
                    continue
                buffer.append(line)
                text = "\n".join(buffer).strip()
                if text.endswith(";"):
                    buffer = []
                    self.statement(text)
            if buffer and "\n".join(buffer).strip():
                self.statement("\n".join(buffer))  # piped input may leave out the last semicolon
        finally:
            if self.interactive:
                self._save_history()
            self.pool.close()

    def statement(self, sql: str) -> None:
        try:
            res = self.pool.run(self.db, sql, self.limits)
        except KeyboardInterrupt:  # the worker was killed with the query; the next statement gets a new one
            print("\nquery cancelled", file=sys.stderr)
            return
        if not res.ok or res.table is None:
            print(res.message, file=sys.stderr)
            return
        frame = pl.from_arrow(res.table)
        assert isinstance(frame, pl.DataFrame)
        self.printer(frame, self.mode, self.stdout)
        print(res.message, file=sys.stderr if self.mode != "table" else self.stdout)

    def dot(self, command: str) -> bool:
        """Run a dot command; False to leave."""
        name, _, arg = command.partition(" ")
        arg = arg.strip()
        if name in (".quit", ".exit", ".q"):
            return False
        if name == ".help":
            print(DOT_HELP.rstrip(), file=self.stdout)
        elif name == ".tables":
            print("  ".join(sorted(self.tables)), file=self.stdout)
            if self.macros:
                print("macros: " + "  ".join(sorted(self.macros)), file=self.stdout)
        elif name == ".schema":
            for table in ([arg] if arg else sorted(self.tables)):
                cols = self.tables.get(table)
                print(f"{table}({', '.join(cols)})" if cols else f"no table or view named {table!r}",
                      file=self.stdout)
        elif name == ".mode" and arg in ("table", "csv", "json"):
            self.mode = arg
        elif name == ".limits":
            print(self.limits.describe(), file=self.stdout)
        else:
            print(f"unknown command {command!r}; .help lists them", file=sys.stderr)
        return True
