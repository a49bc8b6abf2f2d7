"""Remote logging over loopback, with real processes: writers that `start_run("http://...")`, the
dashboard's embedded receiver and `python -m collector serve`, SIGKILLs of either side, and a bad token.
Every check reads the DuckDB file the server wrote. The big case (32 writers x 20,000 steps) is
bench/bench_remote.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from collector.store import read_connection
from tests.dashboard_server import ROOT, Server, free_port, launch, start_server

TOKEN = "remote-test-secret"

# A writer: logs N steps (evals and a scalar every 500), sleeping PAUSE s every 100 steps (0: flat out).
WRITER = """
import sys, time, collector
url, name, n, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with collector.start_run(url, name=name, sweep="remote", batch_size=32, lr=0.1) as run:
    print(run.run_id, flush=True)
    for s in range(1, n + 1):
        run.log_step(s, examples=32 * s, loss=1.0 / s, lr=0.1, batch_size=32, g_small_sq=2.0, b_small=1.0,
                     g_big_sq=1.5, b_big=32.0)
        if s % 500 == 0:
            run.log_eval(s, split="test", loss=1.0 / s, accuracy=0.5)
            run.log(s, grad_norm=float(s))
        if pause and s % 100 == 0:
            time.sleep(pause)
"""


def writer(url: str, name: str, n: int, pause: float, spool: Path, token: str | None = TOKEN,
           heartbeat: float | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCOPE_")}
    env["BATCHSCOPE_SPOOL"] = str(spool)
    if token is not None:
        env["BATCHSCOPE_TOKEN"] = token
    if heartbeat is not None:
        env["BATCHSCOPE_HEARTBEAT_S"] = str(heartbeat)
    return subprocess.Popen([sys.executable, "-c", WRITER, url, name, str(n), str(pause)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def serve(db: Path, tmp: Path, port: int, auth: bool = True, env: dict | None = None) -> Server:
    """`python -m collector serve` on `port`, once /healthz answers."""
    cmd = [sys.executable, "-m", "collector", "serve", "--db", str(db), "--port", str(port)]
    return launch(cmd + (["--auth", f"token:{TOKEN}"] if auth else []), tmp / f"serve-{port}-{time.monotonic_ns()}.err",
                  port, headers={"Authorization": f"Bearer {TOKEN}"}, wait_s=60, env=env, what="collector serve")


def ship_later(url: str, spool: Path, token: str = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCOPE_")} | {"BATCHSCOPE_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "collector", "ingest", "--to", url, str(spool)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def stored(db: Path, sweep: str | None = None, timeout: float = 60) -> dict[str, tuple]:
    """run_id -> (name, status, steps, distinct steps, evals, scalars), read from the DuckDB file (the runs
    of `sweep` only, when given); bench/bench_remote.py checks its writers with it too."""
    if not db.exists():
        return {}
    with read_connection(db, timeout=timeout) as con:
        rows = con.execute(
            "SELECT r.run_id, r.name, r.status, "
            "(SELECT count(*) FROM steps s WHERE s.run_id = r.run_id), "
            "(SELECT count(DISTINCT step) FROM steps s WHERE s.run_id = r.run_id), "
            "(SELECT count(*) FROM evals e WHERE e.run_id = r.run_id), "
            "(SELECT count(*) FROM scalars c WHERE c.run_id = r.run_id) FROM runs r "
            "WHERE $sweep IS NULL OR r.sweep = $sweep", {"sweep": sweep}).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def segments_left(spool: Path) -> list[Path]:
    return sorted(spool.rglob("*.arrow")) if spool.exists() else []


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[str, str]]:
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        assert p.returncode == 0, e
        assert "Traceback" not in e, e
        out.append((o.strip(), e))
    return out


def test_remote_writers_into_the_dashboard_every_row_once(tmp_path):
    """N writer processes ship to the dashboard's embedded receiver (behind its --auth) while it serves
    pages: every step, eval and scalar is stored exactly once, each run `finished`, client spools empty."""
    db = tmp_path / "team.duckdb"
    dash = start_server(db, tmp_path, "--auth", f"token:{TOKEN}", headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        spool = tmp_path / "client"
        procs = [writer(dash.url, f"w{i}", 2000, 0.01, spool) for i in range(3)]
        pages = [dash.request("/", timeout=60).status for _ in range(3)]
        results = finish(procs)
        assert pages == [200, 200, 200]
        assert dash.request("/healthz").json() == {"ok": True, "store": "readable"}
    finally:
        dash.stop()
    runs = stored(db)
    assert sorted(runs) == sorted(r for r, _ in results)
    assert all(v == (f"w{i}", "finished", 2000, 2000, 4, 4) for i, v in
               enumerate(runs[r] for r, _ in results)), runs
    assert segments_left(spool) == []
    assert all(e.strip() == "" for _, e in results), [e for _, e in results]


def test_server_killed_and_restarted_twice_mid_run(tmp_path):
    """SIGKILL of `collector serve` twice while two writers log: they back off, catch up by themselves
    after each restart, and the store ends with every row exactly once and both runs finished."""
    db, port, spool = tmp_path / "team.duckdb", free_port(), tmp_path / "client"
    server = serve(db, tmp_path, port)
    procs = [writer(server.url, f"k{i}", 4000, 0.08, spool) for i in range(2)]
    ids = [p.stdout.readline().strip() for p in procs]
    for _ in range(2):
        time.sleep(1.5)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        time.sleep(1.0)  # the writers meet a closed port meanwhile
        server = serve(db, tmp_path, port)
    try:
        results = finish(procs)
    finally:
        server.stop()
    runs = stored(db)
    assert {r: runs[r] for r in ids} == {ids[i]: (f"k{i}", "finished", 4000, 4000, 8, 8) for i in range(2)}
    assert segments_left(spool) == []
    for _, err in results:  # said once per outage at most, with its way back
        assert err.count("cannot reach") <= 2 and err.count("cannot reach") == err.count("again"), err


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    # Ingest turns at most 5 s apart (users: 30 s), so a run's first row needs no half-minute wait; the
    # stale rule under test (two heartbeats + grace + one turn) is the same.
    server = serve(tmp / "team.duckdb", tmp, free_port(), env={"BATCHSCOPE_INGEST_MAX_GAP": "5"})
    yield server, tmp / "team.duckdb"
    server.stop()


def test_bad_token_one_line_rows_stay_spooled_and_ship_later(team_server, tmp_path):
    server, db = team_server
    spool = tmp_path / "client"
    (out, err), = finish([writer(server.url, "badtoken", 2000, 0.01, spool, token="wrong")])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "refused the credentials" in lines[0] and "collector ingest --to" in lines[0], err
    assert out not in stored(db)
    kept = segments_left(spool)
    assert sum(ipc.open_file(pa.memory_map(str(p))).read_all().num_rows for p in kept if ".steps." in p.name) == 2000
    refused = ship_later(server.url, next(spool.glob("*.spool")), token="wrong")
    assert segments_left(spool) == kept
    done = ship_later(server.url, next(spool.glob("*.spool")))
    assert done.returncode == 0, done.stderr
    assert "shipped 1 run spool(s)" in done.stdout
    assert stored(db)[out] == ("badtoken", "finished", 2000, 2000, 4, 4)
    assert segments_left(spool) == []
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "refused the credentials" in refused.stderr


def test_client_killed_becomes_stale_within_two_heartbeats(team_server, tmp_path):
    """SIGKILL of a writer: its requests stop, the server lets its spool go after two heartbeats, and the
    next ingest turn marks it stale (the store's dead-spool rule). Its local spool ships later."""
    server, db = team_server
    spool = tmp_path / "client"
    proc = writer(server.url, "killed", 10**7, 0.02, spool, heartbeat=1.0)
    try:
        run_id = proc.stdout.readline().strip()
        deadline = time.monotonic() + 60
        while stored(db).get(run_id, (None, None))[1] != "running":  # the first ingest turn has its row
            assert time.monotonic() < deadline, "the run never reached the server's store"
            time.sleep(0.3)
    finally:  # killed whatever happens: a 10^7-step writer left behind would hold a core for minutes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = time.monotonic()
    # polled once a second: each read is a connection the server's ingest turn may find in its way
    while stored(db)[run_id][1] != "stale":
        assert time.monotonic() - killed < 60, "still not stale 60 s after the kill"
        time.sleep(1.0)
    took = time.monotonic() - killed
    # two heartbeats + grace + one ingest turn: ~4 s here; more on a loaded CI machine
    assert took < 2 * 1.0 + 2.0 + 26.0, took
    done = ship_later(server.url, next(spool.glob("*.spool")))
    assert done.returncode == 0, done.stderr
    name, status, n, distinct, _, _ = stored(db)[run_id]
    assert (name, status, n == distinct) == ("killed", "stale", True)
    assert segments_left(spool) == []


# --- bad input: the receiver in-process (Flask's test client over a real store file) -------------------


def _segment(table: dict) -> bytes:
    sink = pa.BufferOutputStream()
    data = pa.table(table)
    with ipc.new_file(sink, data.schema, options=ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(data)
    return sink.getvalue().to_pybytes()


def test_bad_input_is_a_4xx_quarantined_and_replays_are_acknowledged(tmp_path, monkeypatch):
    from collector import serve

    db = tmp_path / "s.duckdb"
    client = serve.make_app(db, auth=f"token:{TOKEN}").test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    row = {"run_id": "abc123", "name": "r", "status": "running"}
    base = "/api/remote/v1/runs/abc123"
    good = _segment({"step": pa.array([1, 2, 3], pa.int64()), "loss": [1.0, 0.5, 0.25]})

    assert client.post(base, data=json.dumps({"run": row})).status_code == 401
    assert client.put(f"{base}/segments/1-000000001.steps.arrow", data=good, headers=auth).status_code == 409
    assert client.post(base, data=b"{not json", headers=auth).status_code == 400
    assert client.post(base, data=json.dumps({"run": row | {"status": "bogus"}}), headers=auth).status_code == 400
    assert client.post(base, data=json.dumps({"run": row | {"evil": 1}}), headers=auth).status_code == 400
    assert client.post(base, data=json.dumps({"run": row, "heartbeat_s": 1}), headers=auth).status_code == 200
    codes = {
        "path": client.put(f"{base}/segments/..%2Frun.json", data=good, headers=auth).status_code,
        "bad name": client.put(f"{base}/segments/run.json", data=good, headers=auth).status_code,
        "bad run id": client.post("/api/remote/v1/runs/a.b", data=json.dumps({"run": row}), headers=auth).status_code,
        "garbled": client.put(f"{base}/segments/1-000000002.steps.arrow", data=b"ARROW1" + b"\0" * 50,
                              headers=auth).status_code,
        "truncated": client.put(f"{base}/segments/1-000000003.steps.arrow", data=good[: len(good) // 2],
                                headers=auth).status_code,
        "foreign columns": client.put(f"{base}/segments/1-000000004.evals.arrow", data=good, headers=auth).status_code,
    }
    assert codes == {"path": 404, "bad name": 400, "bad run id": 400, "garbled": 400, "truncated": 400, "foreign columns": 400}
    assert len(list((tmp_path / "s.duckdb.spool" / "quarantine" / "abc123").iterdir())) == 3
    monkeypatch.setattr(serve, "MAX_SEGMENT_BYTES", 100)
    too_big = client.put(f"{base}/segments/1-000000005.steps.arrow", data=good + b"x" * 100, headers=auth)
    assert too_big.status_code == 413 and "over" in too_big.get_json()["error"]
    monkeypatch.undo()

    first = client.put(f"{base}/segments/1-000000006.steps.arrow", data=good, headers=auth)
    again = client.put(f"{base}/segments/1-000000006.steps.arrow", data=good, headers=auth)
    assert (first.get_json()["known"], again.get_json()["known"]) == (False, True)
    body = json.dumps({"run": row | {"status": "finished"}, "written": {"steps": 3}})
    answers = [client.post(f"{base}/finish", data=body, headers=auth)]
    deadline = time.monotonic() + 60
    while answers[-1].status_code == 202 and time.monotonic() < deadline:  # the receiver's next turn stores it
        time.sleep(0.1)
        answers.append(client.post(f"{base}/finish", data=body, headers=auth))
    assert answers[0].status_code == 202 and answers[-1].status_code == 200
    assert answers[-1].get_json() == {"stored": True, "status": "finished", "missing": {}}
    late = client.put(f"{base}/segments/1-000000006.steps.arrow", data=good, headers=auth)  # its ack was lost
    assert late.status_code == 200 and late.get_json()["known"]
    assert stored(db) == {"abc123": ("r", "finished", 3, 3, 0, 0)}
    assert not (tmp_path / "s.duckdb.spool" / "abc123").exists()


def test_store_commands_refuse_a_server_url(monkeypatch, capsys):
    """$BATCHSCOPE_DB set to a server for the trainers: `collector runs` says what to do instead."""
    from collector.cli import main

    monkeypatch.setenv("BATCHSCOPE_DB", "http://team-server:8050")
    assert main(["runs"]) == 2
    assert "the store is a server (http://team-server:8050" in capsys.readouterr().err
