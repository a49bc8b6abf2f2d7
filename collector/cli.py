"""`python -m collector`: look at and maintain a store from the shell.

    python -m collector runs                      # table of runs
    python -m collector sql "SELECT ..."          # read-only, bounded SQL; --format csv|json, --output FILE
    python -m collector shell                     # interactive read-only SQL prompt (history, tab completion)
    python -m collector ingest                    # move dead runs' spools into the store
    python -m collector ingest --to http://host:8050 [SPOOL_DIR]   # ship spools of ended runs to a server
    python -m collector serve --port 8060         # receive remote runs over HTTP (docs/remote.md)
    python -m collector schema                    # the data dictionary
    python -m collector export DIR / import DIR   # Parquet, one file per table
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import duckdb
import polars as pl

from collector.sql_engine import CLI_LIMITS, Limits, clean_error, csv_text, with_overrides
from collector.sql_worker import run_sql
from collector.store import StoreError, read_connection, resolve_db, spool_root
from collector.transfer import export_store, import_store

RUNS_COLUMNS = ("run_id, name, sweep, status, task, batch_size, lr, optimizer, steps, examples, "
                "round(final_loss, 4) AS final_loss, round(final_test_accuracy, 4) AS test_acc, "
                "round(gap_loss, 4) AS gap_loss")


class UsageError(Exception):
    """Bad input from the user: exit code 2."""


def _frame(db, sql: str, params: list | None = None) -> pl.DataFrame:
    """batchscope's own queries (not the user's SQL, which goes through collector.sql_engine)."""
    with read_connection(db) as con:
        try:
            return con.sql(sql, params=params or None).pl()
        except duckdb.Error as exc:
            raise UsageError(_sql_message(exc)) from exc


def _sql_message(exc: duckdb.Error) -> str:
    """DuckDB's message as DuckDB wrote it: its lines, with the caret under the error, kept."""
    return f"SQL error: {clean_error(exc)}"


def _print(df: pl.DataFrame, fmt: str, output: str | None, file=None) -> None:
    file = file or sys.stdout
    if output:
        path = Path(output)
        ext = path.suffix.lower()
        writers = {".csv": lambda p: p.write_text(csv_text(df)), ".json": df.write_json,
                   ".parquet": df.write_parquet}
        if ext not in writers:
            raise UsageError(f"--output {output}: use a .csv, .json or .parquet file name")
        writers[ext](path)
        print(f"wrote {df.height} rows to {path}", file=sys.stderr)
    elif fmt == "csv":
        file.write(csv_text(df))
    elif fmt == "json":
        file.write(df.write_json() + "\n")
    else:
        with pl.Config(tbl_rows=200, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200,
                       tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            print(df, file=file)
        if df.height > 200:
            print(f"... {df.height} rows; use --format csv or --output to get them all", file=sys.stderr)


def cmd_runs(args) -> None:
    where, params = "", []
    if args.sweep:
        where, params = "WHERE sweep = ?", [args.sweep]
    _print(_frame(args.db, f"SELECT {RUNS_COLUMNS} FROM run_summary {where} ORDER BY started_at", params),
           args.format, args.output)


def _limits(args) -> Limits:
    """CLI_LIMITS with the user's --max-rows, --timeout, --memory-mb, --max-response-mb, --allow-files."""
    for name in ("max_rows", "timeout", "memory_mb", "max_response_mb", "max_cell_chars"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    return with_overrides(CLI_LIMITS, max_rows=args.max_rows, timeout_s=args.timeout, memory_mb=args.memory_mb,
                          max_response_mb=args.max_response_mb, max_cell_chars=args.max_cell_chars,
                          allow_files=args.allow_files or None)


def run_user_sql(db, query: str, limits: Limits) -> pl.DataFrame:
    """The user's query through the bounded engine; a refusal or SQL error raises UsageError (exit 2),
    a query stopped by its time or memory limit, or a busy or unreadable store, raises StoreError (exit 1);
    a cut result says so on stderr."""
    path = resolve_db(db)
    if not path.exists():
        raise StoreError(f"no store at {path}: train a run first (python -m trainer) or pass --db")
    res = run_sql(path, query, limits)
    if not res.ok or res.table is None:
        if res.rule in ("time-limit", "memory-limit", "store"):
            raise StoreError(res.message)
        raise UsageError(res.message)
    if res.truncated:
        print(f"note: {res.message}", file=sys.stderr)
    frame = pl.from_arrow(res.table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def cmd_sql(args) -> None:
    query = args.query if args.query != "-" else sys.stdin.read()
    if not query.strip():
        raise UsageError("empty query")
    _print(run_user_sql(args.db, query, _limits(args)), args.format, args.output)


def cmd_shell(args) -> None:
    from collector.shell import Shell

    path = resolve_db(args.db)
    if not path.exists():
        raise StoreError(f"no store at {path}: train a run first (python -m trainer) or pass --db")
    Shell(path, _limits(args), printer=lambda df, fmt, file: _print(df, fmt, None, file)).run()


def cmd_ingest(args) -> None:
    """Take the ingest lease and move every spool in; one summary line, never a traceback."""
    from collector.ingester import ingest_all

    if args.to or args.spool_dir:
        return _ship(args)
    db = resolve_db(args.db)
    try:
        summary = ingest_all(db, wait=args.wait)
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line with the real cause (e.g. No space left on device)
        raise StoreError(f"ingest into {db} stopped: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    if summary is None:
        raise StoreError(f"another process kept the ingest lease of {db} for {args.wait:g} s; it is moving "
                         "the spools in itself, or try again")
    print(summary.line(db))
    for why in summary.skipped:
        print(f"  skipped {why}")


def _ship(args) -> None:
    """`ingest --to URL [SPOOL_DIR]`: ship the spools of ended (or killed) remote runs to the server."""
    from collector import remote

    url = remote.remote_url(args.to) if args.to else None
    if url is None:
        raise UsageError("--to needs the server's http:// or https:// URL")
    root = Path(args.spool_dir) if args.spool_dir else spool_root(remote.local_spool_db(url))
    try:
        out = remote.ship_dead_spools(url, root, wait=args.wait)
    except remote.AuthError as exc:
        raise StoreError(f"{url} refused the credentials ({exc}): set BATCHSCOPE_TOKEN to the server's "
                         "--auth secret; nothing was sent") from None
    except remote.Unreachable as exc:
        raise StoreError(f"cannot reach {url} ({exc}) for {args.wait:g} s; the spools stay in {root}") from None
    print(f"shipped {out['shipped']} run spool(s) from {root} to {url}: {out['rows']:,} rows in "
          f"{out['segments']} segment(s); {out['live']} live run(s) left to their process; "
          f"skipped {len(out['skipped'])}")
    for why in out["skipped"]:
        print(f"  skipped {why}")


def cmd_serve(args) -> None:
    from collector.serve import cli_serve

    cli_serve(args)


def cmd_schema(args) -> None:
    from schema.dictionary import render

    print(render(args.format))


def cmd_export(args) -> None:
    counts = export_store(args.db, args.folder, args.sweep)
    print(", ".join(f"{t}: {n} rows" for t, n in counts.items()) + f" -> {args.folder}")


def cmd_import(args) -> None:
    counts = import_store(args.db, args.folder)
    print(", ".join(f"{t}: {n} new rows" for t, n in counts.items()) + f" -> {resolve_db(args.db)}")


def _refuse_url_store(args) -> None:
    """A server URL as the store (--db, or $BATCHSCOPE_DB set for remote trainers) names no file here."""
    from collector.remote import remote_url

    if args.func is not cmd_ingest or not (args.to or args.spool_dir):
        url = remote_url(getattr(args, "db", None))
        if url:
            raise UsageError(f"the store is a server ({url}, from --db or $BATCHSCOPE_DB): this command reads a "
                             "store file; run it on the server, or pass --db FILE")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a --db given before the command (python -m collector --db X runs) is not reset to None.
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help="store file (default: $BATCHSCOPE_DB or ./runs.duckdb)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--format", choices=("table", "csv", "json"), default="table", help="stdout format")
    out.add_argument("--output", "-o", metavar="FILE", help="write .csv, .json or .parquet instead")
    lim = argparse.ArgumentParser(add_help=False)
    d = CLI_LIMITS
    lim.add_argument("--max-rows", type=int, help=f"rows at most (default {d.max_rows:,})")
    lim.add_argument("--timeout", type=float, help=f"seconds before the query is stopped (default {d.timeout_s:g})")
    lim.add_argument("--memory-mb", type=int, help=f"memory of the query process, MB (default {d.memory_mb:,})")
    lim.add_argument("--max-response-mb", type=float,
                     help=f"result size at which fetching stops, MB (default {d.max_response_mb:g})")
    lim.add_argument("--max-cell-chars", type=int, help=f"longest text cell (default {d.max_cell_chars:,})")
    lim.add_argument("--allow-files", action="store_true",
                     help="let queries read local files and URLs (read_csv, read_parquet, glob, 'file.csv'); "
                          "off by default")

    p = argparse.ArgumentParser(prog="python -m collector", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", help="store file (default: $BATCHSCOPE_DB or ./runs.duckdb)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("runs", parents=[common, out], help="table of runs (from the run_summary view)")
    s.add_argument("--sweep", help="only this sweep")
    s.set_defaults(func=cmd_runs)
    s = sub.add_parser("sql", parents=[common, out, lim], help="run a read-only, bounded SQL query ('-' reads stdin)")
    s.add_argument("query")
    s.set_defaults(func=cmd_sql)
    s = sub.add_parser("shell", parents=[common, lim], help="interactive read-only SQL prompt with history and "
                       "tab completion (the same limits as sql)")
    s.set_defaults(func=cmd_shell)
    s = sub.add_parser("ingest", parents=[common], help="move every run's spooled rows into the store (quarantining "
                       "unreadable files) and print a summary")
    s.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the ingest lease, or with --to "
                   "for the server (default 30)")
    s.add_argument("--to", metavar="URL", help="ship the spools of ended remote runs to this server instead "
                   "(token from $BATCHSCOPE_TOKEN)")
    s.add_argument("spool_dir", nargs="?", help="with --to: the spool folder (default: where runs logging to URL "
                   "spool, under $BATCHSCOPE_SPOOL or ~/.cache/batchscope/remote)")
    s.set_defaults(func=cmd_ingest)
    s = sub.add_parser("serve", parents=[common], help="receive remote runs over HTTP and write them through the "
                       "ingest lease (docs/remote.md)")
    s.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; 0.0.0.0 for other machines)")
    s.add_argument("--port", type=int, default=8060, help="port (default 8060)")
    s.add_argument("--auth", default=os.environ.get("BATCHSCOPE_AUTH"),
                   help="token:SECRET or USER:PASSWORD, as the dashboard's (default: $BATCHSCOPE_AUTH; none)")
    s.add_argument("--threads", type=int, default=16, help="waitress worker threads (default 16)")
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("schema", parents=[common], help="print the data dictionary")
    s.add_argument("--format", choices=("text", "markdown"), default="text")
    s.set_defaults(func=cmd_schema)
    s = sub.add_parser("export", parents=[common], help="write one Parquet file per table into FOLDER")
    s.add_argument("folder")
    s.add_argument("--sweep", help="only this sweep's runs")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("import", parents=[common], help="load Parquet files written by export (e.g. sample_runs/)")
    s.add_argument("folder")
    s.set_defaults(func=cmd_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _refuse_url_store(args)
        args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StoreError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
