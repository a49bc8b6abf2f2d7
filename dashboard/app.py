"""The Dash application: shell (header, navigation, live refresh, run selection), authentication and
availability (a busy or broken store is a message and a retry, never an HTTP 5xx).

Pages live in dashboard/pages/, one module per page (dash.register_page), each with its layout and its
callbacks side by side. A page's callback is a thin wrapper around a plain function of the store path
(e.g. pages.curves.curves_figure(db, ...)), which the tests and the benchmark call directly.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from html import escape as html_escape
from pathlib import Path

import dash
import duckdb
from dash import Input, Output, State, dcc, html

from collector.store import StoreError
from dashboard import queries
from dashboard.components import PAGES
from dashboard.security import (  # noqa: F401 - parse_auth and install_auth are part of this module's API
    healthz_body,
    install_auth,
    install_browser_protections,
    install_loopback_host_check,
    parse_auth,
)
from dashboard.theme import plural

PAGE_MODULES = ("welcome", "runs", "curves", "noise", "tradeoff", "generalization", "lr_batch", "sql", "run")

LIVE_INTERVAL_MS = 2000  # while a run is `running`
IDLE_INTERVAL_MS = 10000  # otherwise: still notices new runs and stale heartbeats
RECOVER_EVERY_S = 60.0
RETRY_INTERVAL_MS = 2000  # after a callback failed on the store: tick (and so retry the pages) this often

_APP: dash.Dash | None = None


def create_app(db: str | os.PathLike | None = None, auth: str | None = None,
               loopback_only: bool = False) -> dash.Dash:
    """Build the app for the store at `db` (one app per process: Dash pages are process-global);
    `loopback_only`: refuse requests whose Host is not localhost (see security.install_loopback_host_check)."""
    global _APP
    queries.configure(db)
    if _APP is not None:
        return _APP
    app = dash.Dash(
        __name__,
        use_pages=True,
        pages_folder="",
        title="batchscope",
        update_title=None,
        suppress_callback_exceptions=True,
        assets_folder=str(Path(__file__).parent / "assets"),
        on_error=callback_error,
    )
    for name in PAGE_MODULES:
        module = importlib.import_module(f"dashboard.pages.{name}")
        if module.__name__ not in dash.page_registry:  # imported before the app existed
            dash.register_page(module.__name__, **PAGES[module.__name__])
        # with pages_folder="" Dash does not pick up a module's `layout` itself
        dash.page_registry[module.__name__]["layout"] = module.layout
    app.layout = _shell
    _register_shell_callbacks(app)
    install_browser_protections(app.server)
    if loopback_only:
        install_loopback_host_check(app.server)
    if auth:
        install_auth(app.server, auth)
    # --- remote logging (collector/serve.py, owned by the remote-logging work): runs sent over HTTP,
    # behind the same --auth as every other route; written through the store's ingest lease.
    from collector.serve import install_receiver

    install_receiver(app.server, queries.current_db)
    # --- end remote logging
    app.server.register_error_handler(StoreError, _store_error_page)
    app.server.register_error_handler(duckdb.Error, _store_error_page)

    @app.server.route("/healthz")
    def _healthz():
        import flask

        authenticated = not auth or bool(getattr(flask.g, "authenticated", False))
        return healthz_body(authenticated, _store_state(queries.current_db()) if authenticated else "")

    _APP = app
    return app


# ---------------------------------------------------------------------------------------------------
# shell


def _nav() -> list:
    links = []
    for page in sorted(dash.page_registry.values(), key=lambda p: p.get("order") or 0):
        if page.get("nav") is False:
            continue
        links.append(dcc.Link(page["name"], href=page["relative_path"], className="nav-link",
                              id={"type": "nav-link", "path": page["relative_path"]}))
    return links


def _shell() -> html.Div:
    db = queries.current_db()
    return html.Div(
        [
            dcc.Location(id="url"),
            dcc.Store(id="selected-runs", storage_type="session", data=[]),
            dcc.Store(id="store-version", data=None),
            dcc.Interval(id="live-interval", interval=LIVE_INTERVAL_MS, n_intervals=0),
            html.Header(
                [
                    html.Div(
                        [dcc.Link([html.Span("◆", className="logo-mark"), "batchscope"], href="/",
                                  className="logo"),
                         html.Nav(_nav(), className="nav")],
                        className="header-left",
                    ),
                    html.Div(
                        [
                            html.Span(id="selection-badge", className="badge"),
                            html.Span(id="live-badge", className="badge"),
                            html.Span(db.name, className="db-name", title=str(db)),
                        ],
                        className="header-right",
                    ),
                ],
                className="header",
            ),
            html.Div(id="store-alert", className="store-alert", role="status", hidden=True),
            html.Main(dash.page_container, className="main"),
        ],
        className="app",
    )


def _register_shell_callbacks(app: dash.Dash) -> None:
    last_recover = {"t": 0.0}

    @app.callback(
        Output("store-version", "data"),
        Output("live-badge", "children"),
        Output("live-badge", "className"),
        Output("live-interval", "interval"),
        Output("store-alert", "children"),
        Output("store-alert", "hidden"),
        Input("live-interval", "n_intervals"),
        State("store-version", "data"),
    )
    def live_tick(_n, previous):
        db = queries.current_db()
        if time.monotonic() - last_recover["t"] > RECOVER_EVERY_S:
            last_recover["t"] = time.monotonic()
            queries.recover(db)
        token, ov = live_token(db)
        if ov.error:
            badge, cls = "store unavailable", "badge badge-warn"
        elif not ov.exists:
            badge, cls = "no store yet", "badge"
        elif ov.running:
            badge, cls = f"● {ov.running} running · live", "badge badge-live"
        else:
            badge, cls = plural(ov.runs, "run"), "badge"
        interval = LIVE_INTERVAL_MS if ov.running else IDLE_INTERVAL_MS
        if ov.error:
            alert = f"The store is unavailable ({_first_line(ov.error)}); retrying every {RETRY_INTERVAL_MS // 1000} s."
            return dash.no_update, badge, cls, RETRY_INTERVAL_MS, alert, False
        return (token if token != previous else dash.no_update), badge, cls, interval, "", True

    @app.callback(Output("selection-badge", "children"), Input("selected-runs", "data"))
    def selection_badge(selected):
        n = len(selected or [])
        return f"{n} selected" if n else "no runs selected"

    @app.callback(
        Output({"type": "nav-link", "path": dash.ALL}, "className"),
        Input("url", "pathname"),
        State({"type": "nav-link", "path": dash.ALL}, "id"),
    )
    def highlight_nav(pathname, ids):
        return ["nav-link active" if i["path"] == (pathname or "/") else "nav-link" for i in ids]


def live_token(db: Path) -> tuple[str | None, queries.Overview]:
    """A token that changes whenever the store does (pages re-read then), and the store's overview."""
    version = queries.store_version(db)
    ov = queries.overview(db)
    if version is None:
        return None, ov
    # a running run turns stale with time alone: let the clock tick the token while any is running
    clock = int(time.time() // 30) if ov.running else 0
    return f"{version[0]}-{version[1]}-{version[2]}-{clock}", ov


# ---------------------------------------------------------------------------------------------------
# availability: a busy or broken store is a message and a retry


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0][:300] if str(text).strip() else "unknown error"


def is_store_problem(err: BaseException) -> bool:
    return isinstance(err, (StoreError, duckdb.Error, OSError))


def callback_error(err: Exception):
    """Dash's on_error for every callback: instead of an HTTP 500, show what went wrong in the shell's
    alert, forget the store version (so the next tick re-runs the pages) and tick soon."""
    if is_store_problem(err):
        text = f"The store is unavailable ({_first_line(err)}); retrying every {RETRY_INTERVAL_MS // 1000} s."
    else:
        traceback.print_exception(err, file=sys.stderr)
        text = f"This view failed ({type(err).__name__}: {_first_line(err)}); retrying."
    dash.set_props("store-alert", {"children": text, "hidden": False})
    dash.set_props("store-version", {"data": None})
    dash.set_props("live-interval", {"interval": RETRY_INTERVAL_MS})
    return None


def _store_state(db: Path) -> str:
    """'missing', 'readable' or 'unavailable' (busy or broken), from the cached overview."""
    ov = queries.overview(db)
    return "unavailable" if ov.error else ("readable" if ov.exists else "missing")


def _store_error_page(err: Exception):
    """A plain (non-callback) request that met a store problem: a page that says so and reloads itself."""
    import flask

    body = (f"<!doctype html><meta http-equiv='refresh' content='5'><title>batchscope</title>"
            f"<p>The store is unavailable right now ({html_escape(_first_line(err))}). This page retries in 5 s.</p>")
    return flask.Response(body, 200, {"Retry-After": "5", "Cache-Control": "no-store"})
