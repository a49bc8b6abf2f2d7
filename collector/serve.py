"""Remote logging, the server: the HTTP routes for remote runs' spool segments and heartbeats.

`python -m collector serve --db store.duckdb --port P [--auth token:SECRET]`, or embedded in the
dashboard (`install_receiver`, the same routes behind the dashboard's own --auth). What a request does
to the store's spool, idempotence and the answers to bad input: collector/receiver.py.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from collector.receiver import MAX_JSON_BYTES, MAX_SEGMENT_BYTES, Receiver
from collector.store import StoreError

__all__ = ["MAX_JSON_BYTES", "MAX_SEGMENT_BYTES", "Receiver", "cli_serve", "install_receiver", "make_app", "serve"]


# ---------------------------------------------------------------------------------------------------
# HTTP (Flask): the dashboard embeds these routes; `collector serve` runs them alone


def install_receiver(server, db: Path | Callable[[], Path]) -> Callable[[Path], Receiver]:
    """Register the remote-logging routes on a Flask `server` for the store `db` (a path, or a function
    returning the current one). Credentials are whatever the server already requires (the dashboard's
    --auth applies to every route). Returns a function giving the Receiver of a store."""
    import flask

    receivers: dict[Path, Receiver] = {}
    lock = threading.Lock()
    get_db = db if callable(db) else (lambda: Path(db))

    def receiver_of(path: Path) -> Receiver:
        with lock:
            if path not in receivers:
                receivers[path] = Receiver(path)
                receivers[path].adopt()
            return receivers[path]

    def body(limit: int) -> bytes | None:
        req = flask.request
        if req.content_length is not None and req.content_length > limit:
            return None
        data = req.stream.read(limit + 1)
        return None if len(data) > limit else data

    def answer(result: tuple[int, dict]):
        code, payload = result
        return flask.Response(json.dumps(payload), code, {"Content-Type": "application/json",
                                                          "Cache-Control": "no-store"})

    def too_big(limit: int):
        return answer((413, {"error": f"request body over {limit:,} bytes"}))

    def guarded(handler: Callable[[], tuple[int, dict]]):
        try:
            return answer(handler())
        except OSError as exc:  # the server's disk (full, read-only): not the client's fault, and transient
            return answer((503, {"error": f"the server cannot write its spool ({exc}); retry"}))

    @server.route("/api/remote/v1/ping", methods=["GET"])
    def _remote_ping():
        return answer((200, {"ok": True, "api": 1}))

    @server.route("/api/remote/v1/runs/<run_id>", methods=["POST"])
    def _remote_run(run_id):
        data = body(MAX_JSON_BYTES)
        if data is None:
            return too_big(MAX_JSON_BYTES)
        return guarded(lambda: receiver_of(get_db()).accept_run(run_id, data))

    @server.route("/api/remote/v1/runs/<run_id>/segments/<name>", methods=["PUT"])
    def _remote_segment(run_id, name):
        data = body(MAX_SEGMENT_BYTES)
        if data is None:
            return too_big(MAX_SEGMENT_BYTES)
        return guarded(lambda: receiver_of(get_db()).accept_segment(run_id, name, data))

    @server.route("/api/remote/v1/runs/<run_id>/finish", methods=["POST"])
    def _remote_finish(run_id):
        data = body(MAX_JSON_BYTES)
        if data is None:
            return too_big(MAX_JSON_BYTES)
        return guarded(lambda: receiver_of(get_db()).finish(run_id, data))

    return receiver_of


def make_app(db: Path, auth: str | None = None, loopback_only: bool = False):
    """The Flask app of `collector serve`: the receiver, /healthz, and the dashboard's auth scheme."""
    import flask

    # The dashboard's auth scheme, so that one --auth secret serves both (imported here only: the
    # collector package itself never imports the dashboard).
    from dashboard.security import (
        healthz_body,
        install_auth,
        install_browser_protections,
        install_loopback_host_check,
    )

    app = flask.Flask("batchscope-serve")
    install_browser_protections(app)
    if loopback_only:
        install_loopback_host_check(app)
    if auth:
        install_auth(app, auth)
    install_receiver(app, db)(db)  # adopt live remote spools now

    @app.route("/healthz")
    def _healthz():
        authenticated = not auth or bool(getattr(flask.g, "authenticated", False))
        return healthz_body(authenticated, "readable" if db.exists() else "missing")

    return app


def serve(db: Path, host: str = "127.0.0.1", port: int = 8060, auth: str | None = None, threads: int = 16) -> None:
    """Serve the receiver with waitress until interrupted."""
    import logging

    import waitress

    from dashboard.cli import is_local_only

    app = make_app(db, auth, loopback_only=is_local_only(host))
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" under a burst is normal
    print(f"batchscope serve: receiving remote runs on http://{host}:{port}/  store: {db}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        waitress.serve(app, host=host, port=port, threads=threads, ident="batchscope",
                       max_request_body_size=MAX_SEGMENT_BYTES + 2**20, channel_timeout=60)


def cli_serve(args) -> None:
    """`python -m collector serve`: checks the arguments, warns like the dashboard does, serves."""
    from collector.store import resolve_db
    from dashboard.cli import is_local_only
    from dashboard.security import parse_auth

    db = resolve_db(args.db)
    if not db.parent.is_dir():
        raise StoreError(f"--db {db}: folder {db.parent} does not exist")
    if args.auth:
        try:
            parse_auth(args.auth)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
    elif not is_local_only(args.host):
        print(f"warning: listening on {args.host} without --auth: anyone who can reach port {args.port} can write "
              "runs into the store. Pass --auth token:SECRET, and put TLS in front (docs/remote.md).",
              file=sys.stderr, flush=True)
    serve(db, args.host, args.port, args.auth, args.threads)
