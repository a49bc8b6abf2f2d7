"""Run queries of collector.sql_engine in a separate process, so that none can grow or stall the caller.

DuckDB's memory_limit bounds its operators, not every value a query builds: `SELECT range(100000000)` or
a vector of 1 MB strings grows far past it. So the query runs in a worker process that the caller
watches: its RSS is read from /proc every 20 ms and the worker is killed past `Limits.memory_mb`;
past the deadline (the query's time limit, plus the wait for the store's lock, plus a grace for the
transfer) it is killed too. The caller only ever receives the bounded Arrow result.

Protocol: one JSON line per request on the worker's stdin; per answer, two big-endian u64 lengths
(header, payload), a JSON header (ok, message, rule, truncated, elapsed_s) and an Arrow IPC stream.

    pool = WorkerPool(size=2)            # the dashboard: warm workers, at most `size` queries at once
    result = pool.run(db, sql, CONSOLE_LIMITS)
    result = run_sql(db, sql, CLI_LIMITS)  # one query, one process (the CLI)
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa

from collector.sql_engine import (
    MB,
    Limits,
    SqlResult,
    check_sql,
    duckdb_config,
    execute,
    stopped_for_memory,
    stopped_for_time,
)

CONNECT_WAIT_S = 5.0  # how long a query waits for a writer's lock on the store
GRACE_S = 3.0  # beyond the time limit, for the worker's own interrupt and the transfer
POLL_S = 0.02
_FRAME = struct.Struct(">QQ")


def _rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (0 if unknown: not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Forked:
    """The part of Popen that QueryProcess uses, for a worker forked from this process: no second
    interpreter start and imports (seconds on a busy machine). Only for a single-threaded caller."""

    def __init__(self) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                os.close(req_w)
                os.close(resp_r)
                os.dup2(req_r, 0)
                os.dup2(resp_w, 1)
                sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "rb", closefd=False)))
                serve()
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(resp_w)
        self.pid = pid
        self.stdin = os.fdopen(req_w, "wb", buffering=0)
        self.stdout = os.fdopen(resp_r, "rb", buffering=0)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


class QueryProcess:
    """One worker process; runs one query at a time. `fork=True` forks this process instead of starting
    a fresh interpreter (the CLI's way: it is single-threaded when it asks)."""

    def __init__(self, fork: bool = False) -> None:
        if fork:
            self.proc: subprocess.Popen | _Forked = _Forked()
            return
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "collector.sql_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, bufsize=0)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        return _rss_bytes(self.proc.pid)

    def close(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def run(self, db: str | os.PathLike, sql: str, limits: Limits) -> SqlResult:
        """Send one query and wait for its bounded answer, killing the worker past its memory or time
        (or when the wait is interrupted, e.g. Ctrl-C: its answer must never be read as the next one's)."""
        try:
            return self._run(db, sql, limits)
        except BaseException:
            self.close()
            raise

    def _run(self, db: str | os.PathLike, sql: str, limits: Limits) -> SqlResult:
        t0 = time.perf_counter()
        request = json.dumps({"db": str(db), "sql": sql, "limits": limits.to_dict()}).encode() + b"\n"
        try:
            self.proc.stdin.write(request)
        except (BrokenPipeError, OSError):
            return self._died(t0)
        deadline = t0 + limits.timeout_s + CONNECT_WAIT_S + GRACE_S
        cap = limits.memory_mb * MB
        max_payload = int(limits.max_response_mb * MB) + 8 * MB  # the IPC framing adds a little
        fd = self.proc.stdout.fileno()
        buf = bytearray()
        need = _FRAME.size
        lengths: tuple[int, int] | None = None
        while len(buf) < need:
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if ready:
                chunk = os.read(fd, max(need - len(buf), 1 << 16))
                if not chunk:
                    return self._died(t0)
                buf += chunk
                if lengths is None and len(buf) >= _FRAME.size:
                    lengths = _FRAME.unpack_from(buf)
                    if lengths[0] > MB or lengths[1] > max_payload:
                        self.close()
                        return SqlResult(False, "The query process answered more than its size limit.",
                                         rule="size-limit", elapsed_s=time.perf_counter() - t0)
                    need = _FRAME.size + lengths[0] + lengths[1]
                continue
            if self.rss_bytes() > cap:
                self.close()
                return stopped_for_memory(limits, time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                self.close()
                return stopped_for_time(limits, time.perf_counter() - t0)
            if not self.alive:
                return self._died(t0)
        assert lengths is not None
        header = json.loads(bytes(buf[_FRAME.size:_FRAME.size + lengths[0]]))
        table = None
        if lengths[1]:
            payload = pa.py_buffer(bytes(buf[_FRAME.size + lengths[0]:need]))
            table = pa.ipc.open_stream(payload).read_all()
        return SqlResult(header["ok"], header["message"], table=table, rule=header.get("rule"),
                         truncated=header.get("truncated", False), elapsed_s=header.get("elapsed_s", 0.0))

    def _died(self, t0: float) -> SqlResult:
        code = self.proc.poll()
        self.close()
        return SqlResult(False, f"The query process ended unexpectedly (exit status {code}).",
                         elapsed_s=time.perf_counter() - t0)


class WorkerPool:
    """Up to `size` warm workers; a worker that grew past `retire_mb` is replaced after its query."""

    def __init__(self, size: int = 2, retire_mb: int = 300) -> None:
        self.size = size
        self.retire_mb = retire_mb
        self._idle: list[QueryProcess] = []
        self._busy = 0
        self._cond = threading.Condition()
        self._closed = False
        atexit.register(self.close)

    def prestart(self) -> None:
        """Start one idle worker in the background (its imports take a second), so the first query is quick."""

        def _start() -> None:
            worker = QueryProcess()
            with self._cond:
                if self._closed or len(self._idle) + self._busy >= self.size:
                    worker.close()
                    return
                self._idle.append(worker)
                self._cond.notify()

        threading.Thread(target=_start, daemon=True, name="batchscope-sql-worker").start()

    def _take(self, wait_s: float) -> QueryProcess | None:
        end = time.monotonic() + wait_s
        with self._cond:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive:
                        self._busy += 1
                        return worker
                    worker.close()
                if self._busy < self.size:
                    self._busy += 1
                    break
                left = end - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(left)
        try:
            return QueryProcess()
        except BaseException:
            with self._cond:
                self._busy -= 1
                self._cond.notify()
            raise

    def _give_back(self, worker: QueryProcess) -> None:
        """Keep a healthy worker; replace a killed or bloated one in the background, so the next query
        does not wait for a new interpreter."""
        keep = worker.alive and worker.rss_bytes() <= self.retire_mb * MB
        if not keep:
            worker.close()
        with self._cond:
            self._busy -= 1
            if keep and not self._closed:
                self._idle.append(worker)
            elif keep:
                worker.close()
            replace = not keep and not self._closed and not self._idle
            self._cond.notify()
        if replace:
            self.prestart()

    def run(self, db: str | os.PathLike, sql: str, limits: Limits) -> SqlResult:
        """Check `sql`, then run it on a worker; a refusal never starts or wakes one."""
        why = check_sql(sql)
        if why is not None:
            return why
        worker = self._take(wait_s=limits.timeout_s)
        if worker is None:
            return SqlResult(False, f"Refused (rule concurrency): {self.size} queries are already running; "
                                    "try again in a moment.", rule="concurrency")
        try:
            return worker.run(db, sql, limits)
        finally:
            self._give_back(worker)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


def run_sql(db: str | os.PathLike, sql: str, limits: Limits) -> SqlResult:
    """One query in a worker process of its own (the CLI's way: forked when this process is single-threaded
    and can fork, else a fresh interpreter); never raises."""
    why = check_sql(sql)
    if why is not None:
        return why
    worker = QueryProcess(fork=hasattr(os, "fork") and threading.active_count() == 1)
    try:
        return worker.run(db, sql, limits)
    finally:
        worker.close()


# ------------------------------------------------------------------------------------------ the worker


def _answer(req: dict) -> SqlResult:
    from collector.store import StoreError, read_connection

    limits = Limits.from_dict(req["limits"])
    why = check_sql(req["sql"])
    if why is not None:
        return why
    try:
        with read_connection(req["db"], timeout=CONNECT_WAIT_S, config=duckdb_config(limits)) as con:
            return execute(con, req["sql"], limits)
    except StoreError as exc:  # busy (locked past the wait) or not a readable store
        return SqlResult(False, str(exc), rule="store")
    except Exception as exc:  # noqa: BLE001 - the caller shows a message, never a traceback
        return SqlResult(False, f"{type(exc).__name__}: {exc}")


def _encode(res: SqlResult) -> bytes:
    payload = b""
    if res.table is not None:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, res.table.schema) as writer:
            writer.write_table(res.table)
        payload = sink.getvalue().to_pybytes()
    header = json.dumps({"ok": res.ok, "message": res.message, "rule": res.rule, "truncated": res.truncated,
                         "elapsed_s": res.elapsed_s}).encode()
    return _FRAME.pack(len(header), len(payload)) + header + payload


def _exit_with_parent() -> None:
    """End this worker, even mid-query, once the process that started it is gone (it is re-parented).
    A thread polls getppid: PR_SET_PDEATHSIG would fire when the *thread* that spawned us ends."""
    parent = os.getppid()

    def _watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=_watch, daemon=True, name="parent-watch").start()


def serve() -> None:
    """The worker's loop: a request per stdin line, an answer per request on the original stdout."""
    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the caller's terminal is the caller's to handle
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # anything printed (DuckDB's progress bar) goes nowhere, never into the protocol
    os.close(devnull)
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        out.write(_encode(_answer(json.loads(line))))
        out.flush()


if __name__ == "__main__":
    serve()
