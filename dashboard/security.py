"""Serving the dashboard to a team: authentication, the session cookie, and browser protections.

- `--auth token:SECRET`: the first visit is /?token=SECRET; the server answers with a session cookie and
  a redirect that drops the token from the URL. The cookie is `v1.<expiry>.<HMAC-SHA256>` under a key
  derived from the secret: it never contains the secret, expires (30 days), is HttpOnly and
  SameSite=Lax, and Secure when the request came over TLS (directly, or from a proxy that says
  `X-Forwarded-Proto: https`). Changing the secret ends every session. Scripts send
  `Authorization: Bearer SECRET`.
- `--auth USER:PASSWORD`: HTTP basic auth on every request.
- Every route but /healthz needs the credentials (401 otherwise); /healthz answers `{"ok": true}`
  and nothing more without them (no path, no version).
- Always, with or without --auth: `X-Frame-Options: DENY` and CSP `frame-ancestors 'none'` (no framing,
  so no clickjacking), and state-changing requests (POST, PUT, PATCH, DELETE: every Dash callback) from
  another origin are refused with 403 — a page elsewhere cannot drive the console through a logged-in
  browser. Listening on loopback only (the default) and not behind --trusted-proxy, a request whose
  Host is not a loopback name is refused with 400 (DNS rebinding).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import urlsplit

COOKIE = "batchscope_session"
SESSION_S = 30 * 24 * 3600
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


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


def _session_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"batchscope session cookie v1", hashlib.sha256).digest()


def session_cookie(secret: str, now: float | None = None, ttl_s: int = SESSION_S) -> str:
    """A session value that proves knowledge of `secret` until it expires, without containing it."""
    expires = int((time.time() if now is None else now) + ttl_s)
    mac = hmac.new(_session_key(secret), f"v1.{expires}".encode(), hashlib.sha256).hexdigest()
    return f"v1.{expires}.{mac}"


def valid_session(secret: str, value: str | None, now: float | None = None) -> bool:
    """Whether `value` is an unexpired session cookie made with `secret`."""
    if not value:
        return False
    version, _, rest = value.partition(".")
    expires, _, mac = rest.partition(".")
    if version != "v1" or not expires.isdigit():
        return False
    if int(expires) < (time.time() if now is None else now):
        return False
    good = hmac.new(_session_key(secret), f"v1.{expires}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac.encode(), good.encode())


def _eq(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


def came_over_tls(req) -> bool:
    """TLS to us, or to the proxy in front (X-Forwarded-Proto). Only used to add `Secure`, so a forged
    header can make the cookie stricter, never weaker."""
    forwarded = req.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return req.is_secure or forwarded == "https"


def is_authenticated(req, kind: str, user: str, secret: str) -> bool:
    header = req.headers.get("Authorization", "")
    if kind == "basic":
        if header.startswith("Basic "):
            try:
                u, _, p = base64.b64decode(header[6:]).decode().partition(":")
            except Exception:  # noqa: BLE001 - malformed header: not authenticated
                return False
            return _eq(u, user) and _eq(p, secret)
        return False
    if header.startswith("Bearer ") and _eq(header[7:], secret):
        return True
    return valid_session(secret, req.cookies.get(COOKIE))


def install_auth(server, spec: str) -> None:
    """Require the token or basic credentials on every request but /healthz (see the module doc)."""
    import flask

    kind, user, secret = parse_auth(spec)

    @server.before_request
    def _check():
        req = flask.request
        flask.g.authenticated = is_authenticated(req, kind, user, secret)
        if flask.g.authenticated or req.path == "/healthz":
            return None
        if kind == "basic":
            return flask.Response("Authentication required.\n", 401,
                                  {"WWW-Authenticate": 'Basic realm="batchscope", charset="UTF-8"'})
        if _eq(req.args.get("token"), secret):  # first visit with ?token=...: a session, and the token leaves the URL
            resp = flask.redirect(req.path)
            resp.set_cookie(COOKIE, session_cookie(secret), max_age=SESSION_S, httponly=True, samesite="Lax",
                            secure=came_over_tls(req))
            return resp
        return flask.Response("A token is required: open this page as /?token=YOUR_TOKEN.\n", 401)


def same_origin(req) -> bool:
    """Whether a request's Origin (or, lacking it, Sec-Fetch-Site) says it comes from this site.
    No Origin at all (curl, scripts) passes: a browser always sends one on a cross-origin POST."""
    if req.headers.get("Sec-Fetch-Site", "") == "cross-site":
        return False
    origin = req.headers.get("Origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    host = req.headers.get("X-Forwarded-Host", req.host).split(",")[0].strip().lower()
    return urlsplit(origin).netloc.lower() == host


def install_browser_protections(server) -> None:
    """No framing, and no state-changing request from another origin (see the module doc)."""
    import flask

    @server.before_request
    def _origin():
        if flask.request.method in UNSAFE_METHODS and not same_origin(flask.request):
            return flask.Response("Cross-origin request refused.\n", 403)
        return None

    @server.after_request
    def _headers(resp):
        for name, value in SECURITY_HEADERS.items():
            resp.headers.setdefault(name, value)
        return resp


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "ip6-localhost")


def install_loopback_host_check(server) -> None:
    """For a dashboard listening on loopback only: refuse requests whose Host is not a loopback name.
    This defeats DNS rebinding (a page on evil.example re-pointed at 127.0.0.1 would send `Host:
    evil.example`, and its requests would be same-origin, so the Origin check alone does not stop it)."""
    import flask

    @server.before_request
    def _host():
        host = flask.request.host.lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in LOOPBACK_NAMES:
            return flask.Response("Unexpected Host header: this dashboard serves localhost only "
                                  "(use --host, or --trusted-proxy behind a proxy).\n", 400)
        return None


def healthz_body(authenticated: bool, store_state: str) -> dict:
    """What /healthz says: only that the server is up, unless the caller is authenticated."""
    return {"ok": True, "store": store_state} if authenticated else {"ok": True}
