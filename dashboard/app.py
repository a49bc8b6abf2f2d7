"""The Dash application: shell (header, navigation, live refresh, run selection) and authentication.

Pages live in dashboard/pages/, one module per page (dash.register_page), each with its layout and its
callbacks side by side. A page's callback is a thin wrapper around a plain function of the store path
(e.g. pages.curves.curves_figure(db, ...)), which the tests and the benchmark call directly.
"""

from __future__ import annotations

import base64
import hmac
import importlib
import os
import time
from pathlib import Path

import dash
from dash import Input, Output, State, dcc, html

from dashboard import queries
from dashboard.components import PAGES

PAGE_MODULES = ("welcome", "runs", "curves", "noise", "tradeoff", "generalization", "lr_batch", "sql")

LIVE_INTERVAL_MS = 2000  # while a run is `running`
IDLE_INTERVAL_MS = 10000  # otherwise: still notices new runs and stale heartbeats
RECOVER_EVERY_S = 60.0

_APP: dash.Dash | None = None


def create_app(db: str | os.PathLike | None = None, auth: str | None = None) -> dash.Dash:
    """Build the app for the store at `db` (one app per process: Dash pages are process-global)."""
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
    )
    for name in PAGE_MODULES:
        module = importlib.import_module(f"dashboard.pages.{name}")
        if module.__name__ not in dash.page_registry:  # imported before the app existed
            dash.register_page(module.__name__, **PAGES[module.__name__])
        # with pages_folder="" Dash does not pick up a module's `layout` itself
        dash.page_registry[module.__name__]["layout"] = module.layout
    app.layout = _shell
    _register_shell_callbacks(app)
    if auth:
        install_auth(app.server, auth)

    @app.server.route("/healthz")
    def _healthz():
        return {"ok": True, "db": str(queries.current_db())}

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
            badge, cls = f"{ov.runs:,} runs", "badge"
        interval = LIVE_INTERVAL_MS if ov.running else IDLE_INTERVAL_MS
        return (token if token != previous else dash.no_update), badge, cls, interval

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
# authentication for a team deployment


def parse_auth(spec: str) -> tuple[str, str, str]:
    """'token:SECRET' -> ('token', '', SECRET); 'user:password' or 'basic:user:password' -> ('basic', user, pw)."""
    spec = spec.strip()
    if spec.startswith("token:"):
        secret = spec[len("token:"):]
        if not secret:
            raise ValueError("--auth token:SECRET needs a non-empty secret")
        return "token", "", secret
    if spec.startswith("basic:"):
        spec = spec[len("basic:"):]
    user, sep, password = spec.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth takes token:SECRET or USER:PASSWORD")
    return "basic", user, password


def install_auth(server, spec: str) -> None:
    """Require a shared token or HTTP basic auth on every request (except /healthz)."""
    import flask

    kind, user, secret = parse_auth(spec)
    cookie = "batchscope_token"

    def _eq(a: str | None, b: str) -> bool:
        return a is not None and hmac.compare_digest(a.encode(), b.encode())

    @server.before_request
    def _check():
        req = flask.request
        if req.path == "/healthz":
            return None
        if kind == "basic":
            header = req.headers.get("Authorization", "")
            if header.startswith("Basic "):
                try:
                    u, _, p = base64.b64decode(header[6:]).decode().partition(":")
                except Exception:  # noqa: BLE001
                    u = p = ""
                if _eq(u, user) and _eq(p, secret):
                    return None
            return flask.Response("Authentication required.\n", 401,
                                  {"WWW-Authenticate": 'Basic realm="batchscope", charset="UTF-8"'})
        header = req.headers.get("Authorization", "")
        if header.startswith("Bearer ") and _eq(header[7:], secret):
            return None
        if _eq(req.cookies.get(cookie), secret):
            return None
        if _eq(req.args.get("token"), secret):  # first visit with ?token=...: remember it, drop it from the URL
            resp = flask.redirect(req.path)
            resp.set_cookie(cookie, secret, httponly=True, samesite="Lax", max_age=30 * 24 * 3600)
            return resp
        return flask.Response("A token is required: open this page as /?token=YOUR_TOKEN.\n", 401)
