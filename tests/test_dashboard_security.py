"""Team serving and availability, against the real dashboard (waitress) over HTTP on 127.0.0.1.

Auth: every route without credentials is 401 except /healthz, which says nothing but `ok`; the session
cookie is an HMAC of the secret (never the secret), HttpOnly, SameSite, Secure behind TLS, expiring;
framing is forbidden and cross-origin POSTs are refused. Availability: a store locked by another
process or one that is not DuckDB gives messages and retries, never an HTTP 5xx.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dashboard.cli import is_local_only
from dashboard.security import session_cookie, valid_session
from dashboard.synthetic import make_store
from tests.dashboard_server import start_server

SECRET = "s3cret-token"
PROTECTED = ["/", "/sql", "/curves", "/_dash-layout", "/_dash-dependencies", "/assets/style.css",
             "/_favicon.ico", "/no-such-page", "/?token=wrong"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("sec") / "runs.duckdb"
    make_store(db, n_runs=6, steps=200, seeds=1)
    return db


@pytest.fixture(scope="module")
def token_server(store, tmp_path_factory):
    server = start_server(store, tmp_path_factory.mktemp("srv"), "--host", "0.0.0.0", "--auth", f"token:{SECRET}",
                          "--trusted-proxy", "127.0.0.1")
    yield server
    server.stop()


def _cookie(resp) -> str:
    return resp.headers["Set-Cookie"]


def test_healthz_reveals_nothing_without_credentials(token_server, store):
    r = token_server.request("/healthz")
    assert r.status == 200 and r.json() == {"ok": True}
    text = r.body.decode() + str(r.headers)
    assert str(store) not in text and store.name not in text
    assert r.headers.get("Server") == "batchscope"  # no product or version
    assert not any(ch.isdigit() for ch in r.headers["Server"])
    authed = token_server.request("/healthz", headers={"Authorization": f"Bearer {SECRET}"})
    assert authed.json() == {"ok": True, "store": "readable"}
    assert str(store) not in authed.body.decode()


def test_every_route_needs_credentials(token_server):
    for path in PROTECTED:
        assert token_server.request(path).status == 401, path
    post = token_server.request("/_dash-update-component", "POST", b"{}", {"Content-Type": "application/json"})
    assert post.status == 401
    assert "warning" not in token_server.stderr()  # --auth given: no warning about 0.0.0.0
    # listening on all interfaces: any Host name is served (here: asked for credentials)
    assert token_server.request("/", headers={"Host": "dashboard.example.org"}).status == 401


def test_session_cookie_is_an_expiring_hmac(token_server):
    first = token_server.request(f"/?token={SECRET}")
    assert first.status == 302 and first.headers["Location"].endswith("/") and SECRET not in first.headers["Location"]
    cookie = _cookie(first)
    value = cookie.split(";")[0].split("=", 1)[1]
    assert SECRET not in cookie and value != SECRET
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=lax" in flags and "max-age=" in flags and "secure" not in flags
    assert valid_session(SECRET, value) and not valid_session("another-secret", value)
    assert token_server.request("/", headers={"Cookie": f"batchscope_session={value}"}).status == 200
    # a forged expiry breaks the HMAC; an expired session is refused
    version, expires, mac = value.split(".")
    forged = f"{version}.{int(expires) + 10 ** 6}.{mac}"
    assert token_server.request("/", headers={"Cookie": f"batchscope_session={forged}"}).status == 401
    old = session_cookie(SECRET, now=time.time() - 10, ttl_s=5)
    assert not valid_session(SECRET, old)
    assert token_server.request("/", headers={"Cookie": f"batchscope_session={old}"}).status == 401
    assert token_server.request("/", headers={"Cookie": f"batchscope_session={SECRET}"}).status == 401


def test_cookie_is_secure_behind_a_tls_proxy(token_server, store, tmp_path):
    r = token_server.request(f"/?token={SECRET}", headers={"X-Forwarded-Proto": "https"})
    assert r.status == 302 and "secure" in _cookie(r).lower()
    # the header is believed only from --trusted-proxy: without it, waitress drops it
    plain = start_server(store, tmp_path, "--auth", f"token:{SECRET}")
    try:
        r = plain.request(f"/?token={SECRET}", headers={"X-Forwarded-Proto": "https"})
        assert r.status == 302 and "secure" not in _cookie(r).lower()
    finally:
        plain.stop()


def test_no_framing_and_no_cross_origin_posts(token_server):
    bearer = {"Authorization": f"Bearer {SECRET}"}
    page = token_server.request("/", headers=bearer)
    assert page.status == 200
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert token_server.request("/healthz").headers["X-Frame-Options"] == "DENY"
    token_server.headers = bearer
    try:
        same = token_server.callback("sql-grid.rowData", {"sql-run.n_clicks": 1}, {"sql-text.value": "SELECT 42 AS x"})
        assert same.status == 200 and "42" in same.body.decode()
        for evil in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            body = json.dumps({"output": "sql-grid.rowData", "inputs": [], "state": []}).encode()
            r = token_server.request("/_dash-update-component", "POST", body,
                                     {"Content-Type": "application/json", **evil})
            assert r.status == 403, evil
    finally:
        token_server.headers = {}


def test_basic_auth_over_http(store, tmp_path):
    server = start_server(store, tmp_path, "--auth", "alice:pw")
    try:
        r = server.request("/")
        assert r.status == 401 and "Basic" in r.headers["WWW-Authenticate"]
        good = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
        bad = {"Authorization": "Basic " + base64.b64encode(b"alice:nope").decode()}
        assert server.request("/", headers=bad).status == 401
        assert server.request("/", headers=good).status == 200
        assert server.request("/healthz").json() == {"ok": True}
        # listening on localhost only: a rebinding page's Host is refused, localhost names pass
        assert server.request("/", headers={**good, "Host": "evil.example:8050"}).status == 400
        port = server.url.rsplit(":", 1)[1]
        assert server.request("/", headers={**good, "Host": f"localhost:{port}"}).status == 200
    finally:
        server.stop()


def test_warns_when_listening_beyond_localhost_without_auth(store, tmp_path):
    assert is_local_only("127.0.0.1") and is_local_only("::1") and is_local_only("localhost")
    assert not is_local_only("0.0.0.0") and not is_local_only("::") and not is_local_only("myhost.example")
    err = tmp_path / "err"
    proc = subprocess.Popen([sys.executable, "-m", "dashboard", "--db", str(store), "--host", "0.0.0.0",
                             "--port", "1"], stdout=subprocess.DEVNULL, stderr=err.open("w"))
    try:
        end = time.monotonic() + 120
        while "warning" not in err.read_text() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    text = err.read_text()
    assert "warning: listening on 0.0.0.0 without --auth" in text and "--auth token:SECRET" in text


# --------------------------------------------------------------------------------------- availability


def _holder(db: Path, ready: Path) -> subprocess.Popen:
    """Another process that opens the store read-write with plain DuckDB (its lock), changes it (so the
    dashboard's cached results are stale and it must read) and keeps it open."""
    code = ("import duckdb, pathlib, sys, time\n"
            "while True:\n"
            "    try:\n        con = duckdb.connect(sys.argv[1]); break\n"
            "    except duckdb.IOException:\n        time.sleep(0.05)\n"  # the dashboard is reading it
            "con.execute('CREATE TABLE held_by_test AS SELECT 1 AS x'); con.execute('CHECKPOINT')\n"  # a new version
            "pathlib.Path(sys.argv[2]).write_text('held'); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(db), str(ready)])
    end = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < end:
        time.sleep(0.1)
    assert ready.exists()
    return proc


def _alert(resp) -> str:
    return json.dumps(resp.json().get("sideUpdate", {})) + json.dumps(resp.json().get("response", {}))


def test_busy_store_gives_a_message_and_recovers(tmp_path):
    db = tmp_path / "busy.duckdb"
    make_store(db, n_runs=4, steps=50, seeds=1)
    # A page's read waits 1 s for the lock here (users: 5 s) before it says the store is unavailable.
    server = start_server(db, tmp_path, env={"BATCHSCOPE_DASHBOARD_STORE_WAIT_S": "1"})
    try:
        holder = _holder(db, tmp_path / "ready")
        try:
            runs = server.callback("runs-grid.rowData", {"store-version.data": "v-locked"})
            assert runs.status < 500
            assert runs.status == 200 and "unavailable" in _alert(runs) and "retrying" in _alert(runs)
            tick = server.callback("live-badge.children", {"live-interval.n_intervals": 3})
            assert tick.status == 200 and "unavailable" in tick.body.decode() and "retrying" in tick.body.decode()
            sql = server.callback("sql-grid.rowData", {"sql-run.n_clicks": 1}, {"sql-text.value": "SELECT 1"})
            assert sql.status == 200 and ("locked" in sql.body.decode() or "unavailable" in sql.body.decode())
            assert server.request("/healthz").status == 200
        finally:
            holder.kill()
            holder.wait()
        again = server.callback("runs-grid.rowData", {"store-version.data": "v-free"})
        assert again.status == 200 and len(again.json()["response"]["runs-grid"]["rowData"]) == 4
    finally:
        server.stop()


def test_broken_store_gives_a_message(tmp_path):
    db = tmp_path / "broken.duckdb"
    db.write_bytes(b"this is not a DuckDB file\n" * 1000)
    server = start_server(db, tmp_path)
    try:
        for output, inputs in (("runs-grid.rowData", {"store-version.data": "v1"}),
                               ("live-badge.children", {"live-interval.n_intervals": 1}),
                               ("curves-graph", {})):
            try:
                r = server.callback(output, inputs)
            except StopIteration:
                continue  # a page without that output in this version
            assert r.status < 500, (output, r.status, r.body[:300])
        tick = server.callback("live-badge.children", {"live-interval.n_intervals": 2})
        assert "not a readable DuckDB store" in tick.body.decode() or "unavailable" in tick.body.decode()
        page = server.request("/")
        assert page.status == 200
    finally:
        server.stop()
