"""A real dashboard server (python -m dashboard, waitress) in a subprocess, and HTTP calls to it:
plain requests and Dash callbacks, found by their outputs in /_dash-dependencies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Response:
    status: int
    headers: Any  # case-insensitive (http.client.HTTPMessage)
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    stderr_path: Path
    headers: dict = field(default_factory=dict)  # sent with every request (credentials)
    _deps: list | None = None

    def request(self, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120) -> Response:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={**self.headers, **(headers or {})})
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=timeout) as r:
                return Response(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, e.headers, e.read())

    def callback(self, output_has: str, inputs: dict, state: dict | None = None, origin: bool = True) -> Response:
        """POST the Dash callback with the output `output_has` ('id.prop'); inputs/state map 'id.prop' -> value."""
        if self._deps is None:
            self._deps = self.request("/_dash-dependencies").json()
        dep = next(d for d in self._deps if output_has in d["output"].strip(".").split("..."))
        outputs = [dict(zip(("id", "property"), o.rsplit(".", 1), strict=True))
                   for o in dep["output"].strip(".").split("...")]
        payload = {
            "output": dep["output"],
            "outputs": outputs if len(outputs) > 1 else outputs[0],
            "inputs": [_prop(d, inputs) for d in dep["inputs"]],
            "state": [_prop(d, state or {}) for d in dep["state"]],
            "changedPropIds": [f"{k}" for k in inputs],
        }
        headers = {"Content-Type": "application/json"}
        if origin:
            headers["Origin"] = self.url
        return self.request("/_dash-update-component", "POST", json.dumps(payload).encode(), headers)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _prop(dep: dict, values: dict) -> dict:
    key = f"{dep['id']}.{dep['property']}"
    return {"id": dep["id"], "property": dep["property"], "value": values.get(key)}


def start_server(db: Path, tmp: Path, *args: str, headers: dict | None = None, wait_s: float = 120,
                 env: dict | None = None) -> Server:
    """Start `python -m dashboard --db DB` on a free port (`env`: extra variables) and wait until /healthz answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "dashboard", "--db", str(db), "--port", str(port), *args]
    return launch(cmd, tmp / f"dashboard-{port}.err", port, headers=headers, wait_s=wait_s, env=env)


def launch(cmd: list[str], err: Path, port: int, *, headers: dict | None = None, wait_s: float = 120,
           env: dict | None = None, what: str = "dashboard") -> Server:
    """Run `cmd`, a server listening on `port` (stderr to `err`, `env`: extra variables), and return it once
    /healthz answers: the dashboard here, `python -m collector serve` in test_remote."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err.open("w"),
                            env={**os.environ, **(env or {})})
    server = Server(proc, f"http://127.0.0.1:{port}", err, headers=dict(headers or {}))
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {server.stderr()}")
        try:
            if server.request("/healthz", timeout=5).status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{what} did not start")
