"""Remote logging, the client: a run whose store is `http(s)://host:port` ships its spool to a server.

The run spools locally exactly as a local run does (collector/run.py: durable Arrow segments within
~1 s, never waiting on anything). Instead of taking turns as the store's ingester, its second thread
ships: each sealed segment is sent byte for byte (the Arrow IPC file as it is on disk) and deleted
only once the server has acknowledged it, in spool order; the run row (run.json) goes with the first
request and whenever it changes, and as a heartbeat when nothing else was sent for a while. Network
errors and 5xx answers are retried with exponential back-off (tenacity), so a server restart or a cut
only delays shipping; the server (collector/receiver.py) recognises a segment it already has (a lost
ack) and acknowledges it again, so nothing is stored twice.

Refused credentials are said once, in one line, and the run goes on spooling locally; `python -m
collector ingest --to URL [SPOOL_DIR]` ships such spools (and those of killed processes) later.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import tenacity

from collector.spool import QUARANTINE, Spool, quarantine

API = "/api/remote/v1"
HEARTBEAT_S = 5.0  # a run with nothing to send still tells the server it is alive this often
TIMEOUT_S = 30.0  # one request; a finish waits for the server's ingest turn, so it may take seconds
ARROW_TYPE = "application/vnd.apache.arrow.file"


class AuthError(Exception):
    """The server refused the credentials (401/403): retrying will not help."""


class Refused(Exception):
    """The server refused this request's content (4xx): it will not be accepted on a retry either."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class NeedRun(Exception):
    """The server does not know the run (yet, or any more: it restarted, or took it for dead)."""


class Unreachable(Exception):
    """No answer, or a transient one (5xx): retried with back-off."""


class Pending(Unreachable):
    """The server took the run's end and is storing it (202): ask again shortly."""


def remote_url(db) -> str | None:
    """The server URL when the store (`db`, else $BATCHSCOPE_DB) is http(s)://..., else None."""
    target = db if db is not None else os.environ.get("BATCHSCOPE_DB")
    if isinstance(target, str) and target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        if not parts.hostname:
            raise ValueError(f"store URL {target!r} has no host")
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return None


def local_spool_db(url: str) -> Path:
    """Where runs shipping to `url` spool on this machine: $BATCHSCOPE_SPOOL (default
    ~/.cache/batchscope/remote) / <host>_<port>; the spool folder is that path + `.spool`, as for a store."""
    parts = urlsplit(url)
    base = Path(os.environ.get("BATCHSCOPE_SPOOL") or "~/.cache/batchscope/remote").expanduser()
    name = f"{parts.hostname}_{parts.port or (443 if parts.scheme == 'https' else 80)}"
    return base / "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def token_header(token: str | None) -> dict[str, str]:
    """`Authorization` for $BATCHSCOPE_TOKEN: the dashboard's SECRET (or `token:SECRET`) as a Bearer
    token, `basic:USER:PASSWORD` as basic auth."""
    if not token:
        return {}
    if token.startswith("basic:"):
        import base64

        return {"Authorization": "Basic " + base64.b64encode(token[len("basic:"):].encode()).decode()}
    return {"Authorization": "Bearer " + token.removeprefix("token:")}


class Client:
    """HTTP/1.1 to the server over one kept-alive connection (reopened after any error)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = TIMEOUT_S):
        self.url = url
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host, self._port, self._prefix = parts.hostname, parts.port, parts.path.rstrip("/") + API
        self._headers = token_header(token if token is not None else os.environ.get("BATCHSCOPE_TOKEN"))
        self.timeout = timeout
        self._con: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def request(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json",
                timeout: float | None = None) -> dict:
        """One request; the JSON answer of a 2xx. Raises AuthError, Refused, NeedRun or Unreachable."""
        try:
            if self._con is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                self._con = cls(self._host, self._port, timeout=timeout or self.timeout)
            self._con.timeout = timeout or self.timeout
            if self._con.sock is not None:
                self._con.sock.settimeout(self._con.timeout)
            self._con.request(method, self._prefix + path, body=body,
                              headers={**self._headers, "Content-Type": content_type})
            resp = self._con.getresponse()
            status, data = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {"error": data[:200].decode(errors="replace").strip()}
        if not isinstance(answer, dict):
            answer = {"error": str(answer)[:200]}
        if 200 <= status < 300:
            return answer
        message = str(answer.get("error") or f"HTTP {status}")
        if status in (401, 403):
            raise AuthError(f"HTTP {status}")
        if status == 409 and answer.get("need_run"):
            raise NeedRun(message)
        if 400 <= status < 500 and status not in (408, 429):
            raise Refused(status, message)
        raise Unreachable(f"HTTP {status}: {message}")

    def send_run(self, run_id: str, row: dict, heartbeat_s: float) -> dict:
        body = json.dumps({"run": row, "heartbeat_s": heartbeat_s}, default=str).encode()
        return self.request("POST", f"/runs/{run_id}", body)

    def send_segment(self, run_id: str, name: str, data: bytes) -> dict:
        return self.request("PUT", f"/runs/{run_id}/segments/{name}", data, ARROW_TYPE)

    def finish(self, run_id: str, row: dict, written: dict[str, int]) -> dict:
        body = json.dumps({"run": row, "written": written}, default=str).encode()
        answer = self.request("POST", f"/runs/{run_id}/finish", body)
        if answer.get("pending"):  # its next ingest turn stores it, with every other run ending meanwhile
            raise Pending("the server is storing the run")
        return answer


def ship_segments(client: Client, spool: Spool, row: Callable[[], dict], heartbeat_s: float,
                  stop: Callable[[], bool] = lambda: False) -> int:
    """Send every sealed segment of `spool`, oldest first, deleting each once acknowledged; returns how
    many were sent. A segment the server refuses as unreadable is quarantined here too (one line); a
    server that does not know the run gets its row first. Raises AuthError / Unreachable."""
    sent = 0
    for seg in spool.segments(ingested=True) + spool.segments():
        if stop():
            break
        try:
            data = seg.path.read_bytes()
        except FileNotFoundError:
            continue
        for _ in range(3):
            try:
                client.send_segment(spool.run_id, seg.path.name, data)
                break
            except NeedRun:
                client.send_run(spool.run_id, row(), heartbeat_s)
            except Refused as exc:
                quarantine(spool.dir.parent, seg.path, f"the server refused it ({exc})",
                           run_id=spool.run_id, consequence="its rows are not on the server")
                break
        else:
            raise Unreachable("the server kept forgetting the run")
        seg.path.unlink(missing_ok=True)
        sent += 1
    return sent


def _retrying(stop: threading.Event | None, deadline: float | None) -> tenacity.Retrying:
    """Back-off for Unreachable: 0.2 s doubling to 5 s (with jitter), until `stop` is set or `deadline`."""
    stops = []
    if stop is not None:
        stops.append(lambda _state: stop.is_set())
    if deadline is not None:
        stops.append(lambda _state: time.monotonic() >= deadline)
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(Unreachable),
        wait=tenacity.wait_exponential_jitter(initial=0.2, max=5.0, jitter=0.2),
        stop=tenacity.stop_any(*stops) if stops else tenacity.stop_never,
        sleep=stop.wait if stop is not None else
        (lambda s: time.sleep(min(s, max(0.0, deadline - time.monotonic())) if deadline is not None else s)),
        reraise=True)


class Shipper:
    """The shipping half of a remote Run (its second thread, and its finish)."""

    def __init__(self, run, url: str):
        self.run, self.url = run, url
        self.client = Client(url)
        self.heartbeat_s = float(os.environ.get("BATCHSCOPE_HEARTBEAT_S") or HEARTBEAT_S)
        self.auth_failed = False
        self._sent_row: dict | None = None
        self._last_contact = 0.0
        self._down_since: float | None = None

    def _say(self, key: str, message: str) -> None:
        self.run._say(key, message)

    def _row(self) -> dict:
        return dict(self.run._row)

    def ship_once(self) -> None:
        """Run row if new or a heartbeat is due, then every sealed segment."""
        row = self._row()
        # An ended run's row goes after its last segments: a server that has it may store the run as ended.
        if row["status"] != "running" and ship_segments(self.client, self.run.spool, self._row, self.heartbeat_s):
            self._last_contact = time.monotonic()
        if row != self._sent_row or time.monotonic() - self._last_contact >= self.heartbeat_s:
            self.client.send_run(self.run.run_id, row, self.heartbeat_s)
            self._sent_row = row
            self._last_contact = time.monotonic()
        if ship_segments(self.client, self.run.spool, self._row, self.heartbeat_s, self.run._stop.is_set):
            self._last_contact = time.monotonic()
        if self._down_since is not None:
            self._down_since = None
            self.run._warned.discard("unreachable")
            print(f"batchscope: run {self.run.run_id} reaches {self.url} again; shipping what it spooled meanwhile",
                  file=sys.stderr, flush=True)

    def _attempt(self) -> bool:
        """ship_once with back-off on a server that does not answer, until the run stops; False once
        credentials were refused."""
        try:
            for attempt in _retrying(self.run._stop, None):
                with attempt:
                    try:
                        self.ship_once()
                    except Unreachable as exc:
                        self._unreachable(exc)
                        raise
        except AuthError as exc:
            self._refused(exc)
            return False
        except Unreachable:
            return True
        return True

    def loop(self) -> None:
        """Every flush interval, ship; on a dead server, back off (tenacity) and catch up later."""
        while self._attempt() and not self.run._stop.wait(self.run.flush_every):
            pass

    def _unreachable(self, exc: Exception) -> None:
        self._down_since = self._down_since or time.monotonic()
        self._say("unreachable", f"batchscope: cannot reach {self.url} ({exc}); run {self.run.run_id} keeps "
                  f"spooling to {self.run.spool.dir} and retries with back-off")

    def _refused(self, exc: Exception) -> None:
        self.auth_failed = True
        self.run._warned.add("final")  # this line already says where the rows are and how to send them
        self._say("auth", f"batchscope: {self.url} refused the credentials ({exc}): set BATCHSCOPE_TOKEN to the "
                  f"server's --auth secret. Run {self.run.run_id} keeps spooling to {self.run.spool.dir}; send it "
                  f"later with: python -m collector ingest --to {self.url} {self.run.spool.dir.parent}")

    def finish(self) -> bool:
        """After the last segment is spooled: ship everything, then ask the server to store and check the
        run (within the run's finish_timeout). True once the server has it all; on a gap it found, the run
        ends failed (the server records why)."""
        if self.auth_failed:
            return False
        deadline = time.monotonic() + self.run.finish_timeout
        self.run._stop.clear()  # the loop has ended; let ship_segments go through every segment
        try:
            for attempt in _retrying(None, deadline):
                with attempt:
                    self.ship_once()
                    answer = self.client.finish(self.run.run_id, self._row(), dict(self.run.spool.rows_written))
        except AuthError as exc:
            self._refused(exc)
            return False
        except (Unreachable, Refused) as exc:
            self._say("final-remote", f"batchscope: run {self.run.run_id} could not be handed to {self.url} ({exc})")
            return False
        finally:
            self.run._stop.set()
            self.client.close()
        missing = answer.get("missing") or {}
        if missing:
            self.run._status = "failed"
            self._say("missing", f"batchscope: run {self.run.run_id}: {missing} rows are not on the server and "
                      "cannot be put back; it is marked failed there")
        return bool(answer.get("stored"))

    def not_stored_message(self) -> str:
        return (f"batchscope: run {self.run.run_id} is not (all) on {self.url} yet; its rows are safe in "
                f"{self.run.spool.dir}; send them with: python -m collector ingest --to {self.url} "
                f"{self.run.spool.dir.parent}")


# ---------------------------------------------------------------------------------------------------
# `python -m collector ingest --to URL [DIR]`: spools of ended or killed runs, shipped later


def ship_dead_spools(url: str, root: Path, wait: float = 30.0) -> dict:
    """Ship every spool under `root` whose writer has ended (its owner lock is free): its segments, then
    a finish with its last run row (`running` becomes `stale`, as local recovery does). Spools of live
    runs are left to their own process. Returns counts; raises AuthError, or Unreachable after `wait` s."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    out = {"shipped": 0, "segments": 0, "rows": 0, "live": 0, "skipped": []}
    client = Client(url)
    for attempt in _retrying(None, time.monotonic() + wait):
        with attempt:
            client.request("GET", "/ping")  # credentials and reachability, even with nothing to send
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name != QUARANTINE
                  and not p.name.startswith(".")) if root.is_dir() else []
    for run_dir in dirs:
        spool = Spool(root, run_dir.name)
        if not spool.try_own():
            out["live"] += 1
            continue
        try:
            try:
                row = spool.read_run()
            except ValueError as exc:
                quarantine(root, run_dir / "run.json", str(exc), consequence="its segments stay in the spool")
                out["skipped"].append(f"{spool.run_id}: unreadable run.json")
                continue
            if row is None:
                out["skipped"].append(f"{spool.run_id}: no run.json")
                continue
            row = {**row, "run_id": spool.run_id}
            if row.get("status") == "running":
                row = {**row, "status": "stale", "status_reason": "its process ended without finishing the run"}
            written = dict.fromkeys(("steps", "evals", "scalars"), 0)
            for seg in spool.segments(ingested=True) + spool.segments():
                try:
                    with pa.memory_map(str(seg.path)) as src:
                        written[seg.table] += ipc.open_file(src).read_all().num_rows
                except (pa.ArrowException, OSError):
                    pass  # the server refuses it and it is quarantined below
            deadline = time.monotonic() + wait
            for attempt in _retrying(None, deadline):
                with attempt:
                    client.send_run(spool.run_id, row, HEARTBEAT_S)
                    out["segments"] += ship_segments(client, spool, lambda row=row: row, HEARTBEAT_S)
                    answer = client.finish(spool.run_id, row, written)
            if answer.get("stored"):
                spool.remove()
                out["shipped"] += 1
                out["rows"] += sum(written.values())
            else:
                out["skipped"].append(f"{spool.run_id}: the server did not confirm it")
        except Refused as exc:
            out["skipped"].append(f"{spool.run_id}: refused: {exc}")
        finally:
            spool.release()
    client.close()
    return out
