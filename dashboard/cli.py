"""`python -m dashboard` / `batchscope-dashboard`: serve the web UI over a store.

    python -m dashboard                         # ./runs.duckdb (or $BATCHSCOPE_DB) on http://127.0.0.1:8050
    python -m dashboard --db sweeps.duckdb --host 0.0.0.0 --port 8080 --auth token:s3cret
    python -m dashboard --debug                 # Dash's dev server with hot reload and the debug UI

Without --debug it is served by waitress, a production WSGI server. --auth takes token:SECRET (open
the dashboard once as /?token=SECRET; a session cookie, an HMAC of the secret, remembers it; API clients
send `Authorization: Bearer SECRET`) or USER:PASSWORD (HTTP basic auth). $BATCHSCOPE_AUTH is read when
--auth is not given. Listening beyond this machine without --auth prints a warning. Behind a TLS reverse
proxy, see docs/dashboard.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dashboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=None, help="DuckDB store (default: $BATCHSCOPE_DB or ./runs.duckdb)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 for a team (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    p.add_argument("--auth", default=os.environ.get("BATCHSCOPE_AUTH"),
                   help="token:SECRET or USER:PASSWORD (default: $BATCHSCOPE_AUTH; none)")
    p.add_argument("--debug", action="store_true", help="Dash's development server with the debug UI")
    p.add_argument("--threads", type=int, default=8, help="waitress worker threads (default 8)")
    from collector.sql_engine import CONSOLE_LIMITS as d

    p.add_argument("--sql-max-rows", type=int, help=f"SQL console: rows per query (default {d.max_rows:,})")
    p.add_argument("--sql-timeout", type=float, help=f"SQL console: seconds per query (default {d.timeout_s:g})")
    p.add_argument("--sql-memory-mb", type=int,
                   help=f"SQL console: memory of a query's process, MB (default {d.memory_mb:,})")
    p.add_argument("--trusted-proxy", metavar="ADDR", default=None,
                   help="address of a TLS reverse proxy in front (e.g. 127.0.0.1) whose X-Forwarded-Proto/-Host/-For "
                        "headers are believed (session cookies become Secure); ignored from anyone else")
    return p


def _warm_up(db) -> None:
    """Summarize the store, then compute each analysis page for its default scope (the newest sweep),
    so the first visit after a start is served from the query caches rather than from 8 M steps."""
    from dashboard import queries
    from dashboard.components import resolve_scope, scope_options
    from dashboard.pages.generalization import generalization_view
    from dashboard.pages.lr_batch import lr_batch_view
    from dashboard.pages.noise import noise_view
    from dashboard.pages.tradeoff import tradeoff_view

    try:
        queries.overview(db)
        queries.run_table(db)
        _, scope = scope_options(db, None)
        run_ids = resolve_scope(db, scope, None)[0]["run_id"].to_list()
    except Exception:  # noqa: BLE001 - only a head start; pages report problems themselves
        return
    for view in (tradeoff_view, lr_batch_view, noise_view, generalization_view):
        with contextlib.suppress(Exception):
            view(db, run_ids)


def is_local_only(host: str) -> bool:
    """Whether listening on `host` is reachable from this machine only (a loopback address)."""
    if host.strip("[]").lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from collector.store import StoreError
    from dashboard import queries
    from dashboard.app import create_app, parse_auth

    if args.auth:
        try:
            parse_auth(args.auth)
        except ValueError as exc:
            sys.exit(f"error: {exc}")
    try:
        db = queries.configure(args.db)
    except StoreError as exc:
        sys.exit(f"error: {exc}")
    if db.exists():
        n = queries.recover(db)
        if n:
            print(f"recovered {n} run(s) from spools of dead processes", flush=True)
    if not args.auth and not is_local_only(args.host):
        print(f"warning: listening on {args.host} without --auth: anyone who can reach port {args.port} can read "
              "every run and query the store. Pass --auth token:SECRET (or USER:PASSWORD), and put TLS in "
              "front (docs/dashboard.md).", file=sys.stderr, flush=True)
    from collector.sql_engine import with_overrides
    from dashboard import console

    for name in ("sql_max_rows", "sql_timeout", "sql_memory_mb"):
        if (getattr(args, name) or 1) <= 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be positive")
    console.LIMITS = with_overrides(console.LIMITS, max_rows=args.sql_max_rows, timeout_s=args.sql_timeout,
                                    memory_mb=args.sql_memory_mb)
    app = create_app(db, auth=args.auth, loopback_only=is_local_only(args.host) and not args.trusted_proxy)
    console.warm_up()  # a SQL worker process, started in the background
    if db.exists():  # summarize the store once in the background, so the first visit is quick
        import threading

        threading.Thread(target=_warm_up, args=(db,), daemon=True, name="batchscope-warm-up").start()
    state = "" if db.exists() else " (no store yet: the welcome page shows how to make one)"
    if args.host in ("0.0.0.0", "::"):
        where = f"all interfaces, port {args.port} (locally http://127.0.0.1:{args.port}/)"
    else:
        where = f"http://{args.host}:{args.port}/"
    print(f"batchscope dashboard on {where}  store: {db}{state}", flush=True)
    if args.debug:
        app.run(host=args.host, port=args.port, debug=True)
        return
    import waitress

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    proxy = {}
    if args.trusted_proxy:
        proxy = {"trusted_proxy": args.trusted_proxy, "trusted_proxy_count": 1,
                 "trusted_proxy_headers": {"x-forwarded-proto", "x-forwarded-host", "x-forwarded-for"}}
    waitress.serve(app.server, host=args.host, port=args.port, threads=args.threads, ident="batchscope", **proxy)


if __name__ == "__main__":
    main()
