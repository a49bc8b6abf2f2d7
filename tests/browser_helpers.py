"""Helpers for the dashboard's browser tests: a real server subprocess and headless Chromium (selenium).

Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver); the
tests skip when they are missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The README's screenshots are re-made only on request (tools/make_screenshots.sh sets this), so the
# test suite never rewrites tracked files; otherwise they go to a scratch folder and are still checked.
if os.environ.get("BATCHSCOPE_SCREENSHOTS") == "1":
    SCREENSHOTS = ROOT / "docs" / "screenshots"
else:
    SCREENSHOTS = Path(tempfile.gettempdir()) / "batchscope-screenshots"


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m dashboard --db DB --port PORT` in a subprocess (waitress, as users run it)."""

    def __init__(self, db: Path, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"batchscope-dashboard-{self.port}.log"
        self._fh = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dashboard", "--db", str(db), "--port", str(self.port), *extra],
            cwd=ROOT, stdout=self._fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dashboard exited:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"dashboard did not start:\n{self.log.read_text()}")

    def output(self) -> str:
        return self._final if self._final is not None else self.log.read_text()

    _final: str | None = None  # the log's text once stopped (the file is removed: no litter in /tmp)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._fh.close()
        self._final = self.log.read_text()
        self.log.unlink(missing_ok=True)


def make_driver(width: int = 1440, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    assert paths, "chromium / chromedriver not installed"
    browser, driver = paths
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def severe_console_errors(driver) -> list[str]:
    """Browser console entries at level SEVERE since the last call (the log is drained by reading it)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def dash_idle(driver) -> bool:
    """No Dash callback in flight (the renderer marks the document while it is busy)."""
    return driver.execute_script(
        "return document.querySelector('[data-dash-is-loading=\"true\"]') === null"
        " && document.title.indexOf('Updating') === -1;"
    )


def screenshot(driver, name: str) -> Path:
    """Full-page PNG into SCREENSHOTS/<name>.png (docs/screenshots/ only when BATCHSCOPE_SCREENSHOTS=1)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return Math.max(document.body.scrollHeight, 900);")
    driver.set_window_size(1440, min(int(height) + 40, 2600))
    time.sleep(0.3)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1440, 1000)
    return path
