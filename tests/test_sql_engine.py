"""The one SQL engine (collector.sql_engine + sql_worker): rules, limits, and hostile SQL through the
CLI (a real `python -m collector sql` subprocess) and the console (the real dashboard over HTTP, whose
RSS is read from /proc while the queries run)."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from collector.sql_engine import Limits, check_sql, fetch_bounded
from dashboard.synthetic import make_store
from tests.dashboard_server import ROOT, start_server

N_RUNS = 5
RUNAWAY = "SELECT sum(hash(a.range + b.range)) FROM range(1000000) a, range(1000000) b"  # 10^12 rows


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("sql") / "runs.duckdb"
    make_store(db, n_runs=N_RUNS, steps=300, seeds=1)
    return db


def cli(db: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", "sql", "--db", str(db), *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd or ROOT)


# ------------------------------------------------------------------------------------------ rules


@pytest.mark.parametrize(("sql", "rule"), [
    ("INSERT INTO runs (run_id) VALUES ('x')", "read-only"),
    ("UPDATE runs SET lr = 1", "read-only"),
    ("DELETE FROM steps", "read-only"),
    ("CREATE TABLE t AS SELECT 1", "read-only"),
    ("DROP TABLE runs", "read-only"),
    ("COPY steps TO '/tmp/leak.csv'", "no-files"),
    ("COPY (SELECT 1) TO '/tmp/leak.csv'", "no-files"),
    ("ATTACH '/tmp/other.duckdb' AS o", "no-files"),
    ("EXPORT DATABASE '/tmp/x'", "no-files"),
    ("INSTALL httpfs", "no-extensions"),
    ("LOAD httpfs", "no-extensions"),
    ("FORCE INSTALL httpfs", "no-extensions"),
    ("SET enable_external_access = true", "no-settings"),
    ("PRAGMA enable_external_access", "no-settings"),
    ("RESET memory_limit", "no-settings"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/x.csv'", "no-files"),
    ("EXPLAIN ANALYZE DELETE FROM runs", "read-only"),
    ("SELECT 1; DELETE FROM runs", "one-statement"),
    ("UPDATE EXTENSIONS", "read-only"),
    ("CHECKPOINT", "read-only"),
    ("USE memory", "no-settings"),
    ("/* sneaky */ insert into runs (run_id) values ('y')", "read-only"),
])
def test_refusals_name_their_rule(sql, rule):
    res = check_sql(sql)
    assert res is not None and not res.ok and res.rule == rule
    assert f"rule {rule}" in res.message


@pytest.mark.parametrize("sql", ["SELECT 1", "WITH x AS (SELECT 1 AS a) SELECT * FROM x", "FROM runs", "VALUES (1)",
                                 "DESCRIBE runs", "SHOW TABLES", "SUMMARIZE runs", "EXPLAIN SELECT 1",
                                 "EXPLAIN ANALYZE SELECT 1",
                                 "PIVOT runs ON status IN ('finished', 'running') USING count(*)"])
def test_queries_pass_the_rules(sql):
    assert check_sql(sql) is None


def test_fetch_bounded_cuts_exactly_at_each_limit():
    con = duckdb.connect()
    rows, cuts = fetch_bounded(con.sql("SELECT * FROM range(100000000000)"), Limits(max_rows=2500))
    assert rows.num_rows == 2500 and cuts == ["row-limit"]
    assert rows.column(0).to_pylist() == list(range(2500))
    small, cuts = fetch_bounded(con.sql("SELECT * FROM range(10)"), Limits(max_rows=10))
    assert small.num_rows == 10 and cuts == []  # exactly at the limit: nothing was cut
    # 1,000-character strings under a 1 MB response limit: as many rows as fit, and no more
    table, cuts = fetch_bounded(con.sql("SELECT repeat('x', 1000) AS s FROM range(5000)"),
                                Limits(max_response_mb=1.0))
    assert cuts == ["size-limit"] and table.nbytes <= 1 << 20
    one_more = con.sql(f"SELECT repeat('x', 1000) AS s FROM range({table.num_rows + 1})").to_arrow_table()
    assert one_more.nbytes > (1 << 20) - 2048  # the next row would have passed (close to) the limit
    cells, cuts = fetch_bounded(con.sql("SELECT repeat('é', 50) AS a, 'short' AS b"), Limits(max_cell_chars=20))
    assert cuts == ["cell-limit"] and cells.column("a")[0].as_py() == "é" * 20 and cells.column("b")[0].as_py() == "short"


# -------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(("sql", "rule"), [
    ("COPY steps TO '{tmp}/leak.csv'", "no-files"),
    ("SELECT * FROM read_csv('/etc/passwd')", "no-files"),
    ("SELECT * FROM read_text('/etc/passwd')", "no-files"),
    ("SELECT * FROM glob('/*')", "no-files"),
    ("SELECT * FROM read_parquet('/**/*.parquet')", "no-files"),
    ("SELECT * FROM '/etc/passwd'", "no-files"),
    ("SELECT * FROM '{tmp}/data.csv'", "no-files"),
    ("ATTACH '{tmp}/other.duckdb' AS o", "no-files"),
    ("INSTALL httpfs", "no-extensions"),
    ("LOAD httpfs", "no-extensions"),
    ("DELETE FROM runs", "read-only"),
])
def test_cli_refuses_hostile_sql(store, tmp_path, sql, rule):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    r = cli(store, sql.format(tmp=tmp_path))
    assert r.returncode == 2 and f"rule {rule}" in r.stderr
    assert "root:" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "other.duckdb").exists()
    with duckdb.connect(str(store), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == N_RUNS


def test_cli_allow_files_reads_files_only_when_asked(store, tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n3,4\n")
    refused = cli(store, "SELECT sum(a) AS s FROM 'data.csv'", cwd=tmp_path)
    assert refused.returncode == 2 and "rule no-files" in refused.stderr
    allowed = cli(store, "SELECT sum(a) AS s FROM 'data.csv'", "--allow-files", "--format", "csv", cwd=tmp_path)
    assert allowed.returncode == 0 and allowed.stdout == "s\n4\n"
    copy = cli(store, f"COPY runs TO '{tmp_path}/out.csv'", "--allow-files")  # still no writes
    assert copy.returncode == 2 and "rule no-files" in copy.stderr and not (tmp_path / "out.csv").exists()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_install_and_load_are_never_attempted(store, tmp_path):
    log = tmp_path / "trace"
    for sql in ("INSTALL httpfs", "LOAD httpfs", "SELECT * FROM read_parquet('https://example.com/x.parquet')"):
        r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,connect,mkdir", "-o", str(log),
                            sys.executable, "-m", "collector", "sql", "--db", str(store), sql],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 2, r.stderr
        calls = log.read_text()
        assert ".duckdb/extensions" not in calls and "httpfs" not in calls
        assert "AF_INET" not in calls and "AF_INET6" not in calls  # no network


def test_cli_bounds_huge_results_strings_and_runaways(store):
    many = cli(store, "SELECT * FROM range(100000000000)", "--max-rows", "1000", "--format", "csv")
    assert many.returncode == 0 and many.stdout.splitlines() == ["range", *map(str, range(1000))]
    assert "rule row-limit" in many.stderr
    huge = cli(store, "SELECT repeat('x', 100000000) AS s", "--format", "csv")
    assert huge.returncode == 0 and len(huge.stdout.splitlines()[1]) == 1_000_000 and "rule cell-limit" in huge.stderr
    slow = cli(store, RUNAWAY, "--timeout", "1")
    assert slow.returncode == 1 and "rule time-limit" in slow.stderr and "Traceback" not in slow.stderr


def test_cli_memory_is_bounded(store):
    """1,500 strings of 1 MB: the query process is stopped at its memory limit; the peak RSS of every
    process involved (the CLI and its worker) stays near that limit."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.stderr.write(r.stderr)")
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "collector", "sql", "--db", str(store),
                        "--memory-mb", "700", "SELECT repeat('x', 1000000) FROM range(1500)"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    returncode, peak_kb = map(int, r.stdout.split())
    assert returncode == 1 and "rule memory-limit" in r.stderr, r.stderr
    assert peak_kb < 1200 * 1024  # 700 MB limit + what grows between two 20 ms polls; unbounded it is ~3 GB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_cli_keeps_duckdbs_error_with_its_caret(store):
    r = cli(store, "SELECT lr, FROM runs WHERE")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    where = next(i for i, ln in enumerate(lines) if ln.startswith("LINE 1:"))
    assert lines[where + 1].strip().startswith("^")  # the caret stays on its own line, under the error
    assert lines[where + 1].index("^") > len("LINE 1: ")


def test_cli_csv_has_no_bom_and_unquoted_numbers(store, tmp_path):
    sql = "SELECT 1 AS i, 2.5 AS x, 'a,b' AS s, 'plain' AS t, NULL::DOUBLE AS n"
    out = cli(store, sql, "--format", "csv")
    assert out.returncode == 0 and out.stdout == 'i,x,s,t,n\n1,2.5,"a,b",plain,\n'
    cli(store, sql, "--output", str(tmp_path / "q.csv"))
    raw = (tmp_path / "q.csv").read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf") and raw == out.stdout.encode()


# ------------------------------------------------------------------------------------ the console


HOSTILE = [
    ("SELECT * FROM range(100000000000)", "row-limit"),
    ("SELECT repeat('x', 100000000) AS s", "cell-limit"),
    ("SELECT repeat('x', 1000000) FROM range(1500)", "memory-limit"),
    ("SELECT repeat('x', 9000) AS s FROM range(5000)", "size-limit"),
    ("SELECT range(100000000) AS big_list", "memory-limit"),
    ("COPY steps TO '/tmp/batchscope-leak.csv'", "no-files"),
    ("SELECT * FROM read_csv('/etc/passwd')", "no-files"),
    ("SELECT * FROM glob('/*')", "no-files"),
    ("SELECT * FROM read_parquet('/**/*.parquet')", "no-files"),
    ("SELECT * FROM '/etc/passwd'", "no-files"),
    ("ATTACH '/tmp/batchscope-other.duckdb' AS o", "no-files"),
    ("INSTALL httpfs", "no-extensions"),
    ("LOAD httpfs", "no-extensions"),
    ("INSERT INTO runs (run_id) VALUES ('x')", "read-only"),
    (RUNAWAY, "time-limit"),
]


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    srv = start_server(store, tmp_path_factory.mktemp("console"), "--sql-timeout", "3")
    yield srv
    srv.stop()


def test_console_hostile_sql_over_http_keeps_the_server_bounded(server):
    ok = server.callback("sql-grid.rowData", {"sql-run.n_clicks": 1}, {"sql-text.value": "SELECT 1 AS one"})
    assert ok.status == 200
    baseline_kb = server.rss_kb()
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:  # the server's RSS every 10 ms while the queries run
        while not done.is_set():
            samples.append(server.rss_kb())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sizes = {}
    try:
        for sql, rule in HOSTILE:
            r = server.callback("sql-grid.rowData", {"sql-run.n_clicks": 2}, {"sql-text.value": sql})
            assert r.status == 200, (sql, r.status)
            out = r.json()["response"]
            assert f"rule {rule}" in out["sql-message"]["children"], (sql, out["sql-message"]["children"])
            if rule == "time-limit":
                assert "3 s time limit" in out["sql-message"]["children"]  # --sql-timeout 3
            assert "root:" not in r.body.decode()
            sizes[sql] = len(r.body)
    finally:
        done.set()
        sampler.join()
    assert not Path("/tmp/batchscope-leak.csv").exists() and not Path("/tmp/batchscope-other.duckdb").exists()
    # responses are bounded (16 MB of Arrow, as JSON) and the server itself never held a huge result
    assert max(sizes.values()) < 40 * 1024 * 1024, sizes
    assert len(samples) > 100 and max(samples) - baseline_kb < 400 * 1024, (baseline_kb, max(samples))
    after = server.callback("sql-grid.rowData", {"sql-run.n_clicks": 3},
                            {"sql-text.value": "SELECT count(*) AS n FROM runs"})
    assert after.json()["response"]["sql-grid"]["rowData"] == [{"n": N_RUNS}]  # still serving


def test_console_csv_export_and_examples_over_http(server):
    sql = "SELECT 1 AS i, 2.5 AS x, 'a,b' AS s, NULL::DOUBLE AS n FROM range(3)"
    shown = server.callback("sql-grid.rowData", {"sql-run.n_clicks": 1}, {"sql-text.value": sql})
    out = shown.json()["response"]
    assert out["sql-export"]["disabled"] is False and out["sql-last"]["data"] == sql
    export = server.callback("sql-download.data", {"sql-export.n_clicks": 1}, {"sql-last.data": sql})
    download = export.json()["response"]["sql-download"]["data"]
    assert download["filename"].endswith(".csv")
    assert download["content"] == 'i,x,s,n\n' + '1,2.5,"a,b",\n' * 3  # no BOM, numbers unquoted
    # choosing an example replaces the text and clears the previous result and its timing
    deps = server.request("/_dash-dependencies").json()
    dep = next(d for d in deps if d["output"].startswith("..sql-text.value"))
    example = {"id": {"type": "sql-example", "index": 1}, "property": "n_clicks", "value": 1}
    payload = {"output": dep["output"],
               "outputs": [dict(zip(("id", "property"), o.rsplit(".", 1), strict=True))
                           for o in dep["output"].strip(".").split("...")],
               "inputs": [[{**example, "id": {"type": "sql-example", "index": i}, "value": int(i == 1)}
                           for i in range(5)]],
               "state": [], "changedPropIds": ['{"index":1,"type":"sql-example"}.n_clicks']}
    r = server.request("/_dash-update-component", "POST", json.dumps(payload).encode(),
                       {"Content-Type": "application/json", "Origin": server.url})
    assert r.status == 200, r.body[:500]
    cleared = r.json()["response"]
    assert cleared["sql-text"]["value"].startswith("SELECT r.name")
    assert cleared["sql-grid"]["rowData"] == [] and cleared["sql-message"]["children"] == ""
    assert cleared["sql-export"]["disabled"] is True and cleared["sql-last"]["data"] is None
