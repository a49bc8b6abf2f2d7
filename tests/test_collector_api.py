"""The logging API, the CLI and migrations, on real DuckDB files."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

import collector
from schema import SCHEMA_VERSION, ensure_schema, store_version
from schema.migrations import create_table_sql

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def _q(db, sql, params=None):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def cli(*args: str, db: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "collector", *args] + (["--db", str(db)] if db else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_run_roundtrip_with_unknown_keys_going_to_scalars(tmp_path):
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db, name="b32", sweep="s", config={"lr": 0.1}, task="digits", lr=0.1,
                             batch_size=32, seed=np.int64(3)) as run:
        run.log_step(1, examples=32, loss=2.0, lr=0.1, batch_size=32, my_norm=np.float32(1.5))
        run.log_step(2, examples=np.int64(64), loss=np.float64(1.0), lr=0.1, batch_size=32)
        run.log_steps({"step": np.array([3, 4]), "loss": np.array([0.9, 0.8]), "examples": [96, 128],
                       "g_small_sq": [2.0, 2.0], "b_small": [16, 16], "g_big_sq": [1.5, 1.5], "b_big": [32, 32],
                       "extra_stat": [7.0, 8.0]})
        run.log_eval(4, split="test", loss=0.9, accuracy=0.7, examples=128)
        run.log(4, custom=3)
    assert _q(db, "SELECT step, examples, loss FROM steps ORDER BY step") == [
        (1, 32, 2.0), (2, 64, 1.0), (3, 96, 0.9), (4, 128, 0.8)]
    assert _q(db, "SELECT step, name, value FROM scalars ORDER BY step, name") == [
        (1, "my_norm", 1.5), (3, "extra_stat", 7.0), (4, "custom", 3.0), (4, "extra_stat", 8.0)]
    status, cfg, seed, host = _q(db, "SELECT status, config, seed, host FROM runs")[0]
    assert status == "finished" and json.loads(cfg) == {"lr": 0.1} and seed == 3 and host
    assert _q(db, "SELECT wall_time > 0 FROM steps WHERE step = 1") == [(True,)]


def test_nonfinite_loss_is_data_and_marks_the_run_diverged(tmp_path):
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db, name="big-lr") as run:
        run.log_step(1, loss=5.0)
        run.log_step(2, loss=math.inf)
        run.log_step(3, loss=math.nan)
    assert _q(db, "SELECT status, diverged, steps FROM run_summary") == [("diverged", True, 3)]
    assert _q(db, "SELECT count(*) FROM steps WHERE isnan(loss) OR isinf(loss)") == [(2,)]


def test_exception_in_the_loop_marks_the_run_failed(tmp_path):
    db = tmp_path / "runs.duckdb"
    with pytest.raises(RuntimeError), collector.start_run(db, name="crash") as run:
        run.log_step(1, loss=1.0)
        raise RuntimeError("boom")
    assert _q(db, "SELECT status, steps FROM run_summary") == [("failed", 1)]


@pytest.mark.parametrize("bad", ["0.5", None, [1.0], object()])
def test_non_numeric_metrics_raise_at_the_call(tmp_path, bad):
    with collector.start_run(tmp_path / "r.duckdb", name="x") as run:
        if bad is None:  # None means "not measured" for known columns, but not as a step
            with pytest.raises(TypeError):
                run.log_step(None, loss=1.0)
        else:
            with pytest.raises(TypeError):
                run.log_step(1, loss=bad)
            with pytest.raises(TypeError):
                run.log(1, thing=bad)


def test_bad_run_arguments(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        collector.start_run(tmp_path / "r.duckdb", name="  ")
    with pytest.raises(ValueError, match="unknown run field"):
        collector.start_run(tmp_path / "r.duckdb", name="x", batchsize=3)
    with pytest.raises(collector.StoreError, match="directory"):
        collector.start_run(tmp_path, name="x")
    with collector.start_run(tmp_path / "r.duckdb", name="x") as run:
        with pytest.raises(ValueError, match="shape"):
            run.log_steps({"step": [1, 2], "loss": [1.0]})
        with pytest.raises(ValueError, match="split"):
            run.log_eval(1, split="", loss=1.0)
        with pytest.raises(ValueError, match="non-empty"):
            run.log(1, **{"": 1.0})


def test_corrupt_store_keeps_the_run_spooling(tmp_path, capsys):
    db = tmp_path / "runs.duckdb"
    db.write_bytes(b"this is not a duckdb file" * 100)
    with collector.start_run(db, name="x", finish_timeout=0.5) as run:
        run.log_step(1, loss=1.0)
    err = capsys.readouterr().err
    assert "not a readable DuckDB store" in err and "spool" in err
    assert db.read_bytes().startswith(b"this is not")  # we never overwrite a user's file
    segments = list((tmp_path / "runs.duckdb.spool" / run.run_id).glob("*.arrow"))
    assert segments


def test_v1_store_migrates_without_data_loss(tmp_path):
    db = tmp_path / "v1.duckdb"
    shutil.copy(FIXTURES / "store_v1.duckdb", db)
    before = {t: _q(db, f"SELECT count(*) FROM {t}")[0][0] for t in ("runs", "steps", "evals", "scalars")}
    assert _q(db, "SELECT max(version) FROM schema_version") == [(1,)]
    res = cli("runs", db=db)
    assert res.returncode == 0, res.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        assert store_version(con)[0] == SCHEMA_VERSION
    after = {t: _q(db, f"SELECT count(*) FROM {t}")[0][0] for t in before}
    assert after == before and before["steps"] > 0
    # Same columns and types as a store created fresh by this release.
    fresh = tmp_path / "fresh.duckdb"
    with duckdb.connect(str(fresh)) as con:
        ensure_schema(con)
    q = "SELECT table_name, column_name, data_type FROM information_schema.columns ORDER BY ALL"
    assert _q(db, q) == _q(fresh, q)
    # The old rows are readable through the new views.
    assert _q(db, "SELECT count(*) FROM run_summary WHERE steps > 0")[0][0] == before["runs"]
    assert _q(db, "SELECT count(*) FROM run_stats")[0][0] == before["runs"]  # the cache was filled


def test_run_summary_survives_steps_written_outside_the_collector(tmp_path):
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db, name="a", lr=0.1, batch_size=8) as run:
        for i in range(1, 11):
            run.log_step(i, examples=8 * i, loss=1.0 / i)
    summary = "SELECT steps, examples, final_loss, best_loss, diverged FROM run_summary"
    assert _q(db, summary) == [(10, 80, 0.1, 0.1, False)]
    # An analyst appends rows by hand (not through the collector): the cache no longer matches steps,
    # so run_summary recomputes that run instead of showing stale figures.
    with duckdb.connect(str(db)) as con:
        con.execute("INSERT INTO steps (run_id, step, examples, loss) SELECT run_id, 11, 88, 'nan' FROM runs")
    steps, examples, final_loss, best_loss, diverged = _q(db, summary)[0]
    assert (steps, examples, best_loss, diverged) == (11, 88, 0.1, True) and math.isnan(final_loss)
    with duckdb.connect(str(db)) as con:  # the documented refresh brings the cache back in step
        con.execute("INSERT OR REPLACE INTO run_stats SELECT * FROM run_stats_of('uncached_steps')")
        assert con.execute("SELECT count(*) FROM uncached_steps").fetchall() == [(0,)]
        assert con.execute("SELECT n_steps, steps, has_nonfinite_loss FROM run_stats").fetchall() == [(11, 11, True)]



def test_a_last_ingest_of_steps_without_a_loss_keeps_the_cached_final_loss(tmp_path):
    """A DDP run whose last block could not be reduced ends with steps that have no loss (NULL); when
    they reach the store in an ingest of their own, the cached final_loss stays the last loss logged."""
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db, name="ddp", lr=0.1, batch_size=8) as run:
        for i in range(1, 11):
            run.log_step(i, examples=8 * i, loss=1.0 / i)
        run._spool_buffers()
        assert run._try_ingest()  # steps 1-10 are in the store: the tail below is an ingest of its own
        for i in range(11, 15):
            run.log_step(i, examples=8 * i, g_small_sq=2.0, b_small=1, g_big_sq=1.0, b_big=8)
    assert _q(db, "SELECT n_steps, steps, final_loss FROM run_stats") == [(14, 14, 0.1)]
    assert _q(db, "SELECT steps, final_loss, best_loss FROM run_summary") == [(14, 0.1, 0.1)]


def test_fresh_ddl_comes_from_sqlalchemy_and_matches_the_duckdb_dialect():
    import duckdb_engine
    from sqlalchemy.schema import CreateTable

    from schema import metadata

    ddl = create_table_sql()
    assert ddl == [str(CreateTable(t).compile(dialect=duckdb_engine.Dialect())).strip() for t in metadata.sorted_tables]
    text = "\n".join(ddl)
    assert "CREATE TABLE steps" in text and "PRIMARY KEY (run_id, step)" in text and "DOUBLE" in text


def test_cli_sql_formats_and_errors(tmp_path):
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db, name="a", lr=0.1, batch_size=8) as run:
        for i in range(1, 4):
            run.log_step(i, loss=1.0 / i)
    res = cli("sql", "SELECT step, loss FROM steps ORDER BY step", "--format", "csv", db=db)
    assert res.returncode == 0 and res.stdout.splitlines() == ["step,loss", "1,1.0", "2,0.5", "3,0.3333333333333333"]
    res = cli("sql", "SELECT step FROM steps ORDER BY step", "--format", "json", db=db)
    assert json.loads(res.stdout) == [{"step": 1}, {"step": 2}, {"step": 3}]
    out = tmp_path / "o.parquet"
    assert cli("sql", "SELECT * FROM steps", "--output", str(out), db=db).returncode == 0
    assert _q(db, f"SELECT count(*) FROM read_parquet('{out}')") == [(3,)]
    table = cli("runs", db=db)
    assert table.returncode == 0 and "finished" in table.stdout
    before = cli("--db", str(db), "runs", "--format", "csv")  # --db before the command works too
    assert before.returncode == 0 and before.stdout.count("finished") == 1

    for query, needle in [("DELETE FROM steps", "read-only"), ("CREATE TABLE x (a INT)", "read-only"),
                          ("", "empty query")]:
        res = cli("sql", query, db=db)
        assert res.returncode == 2, (query, res.stderr)
        assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    # A syntax error keeps DuckDB's own message with its caret under the offending word (issue 15).
    res = cli("sql", "SELEC 1", db=db)
    lines = res.stderr.rstrip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "Parser Error" in lines[0] and lines[1] == "LINE 1: SELEC 1" and lines[2].strip() == "^^^^^", lines
    assert _q(db, "SELECT count(*) FROM steps") == [(3,)]

    missing = cli("runs", db=tmp_path / "nope.duckdb")
    assert missing.returncode == 1 and "no store" in missing.stderr
    assert not (tmp_path / "nope.duckdb").exists()
    directory = cli("runs", db=tmp_path)
    assert directory.returncode == 1 and "directory" in directory.stderr


def test_locked_store_cli_waits_then_names_the_holder(tmp_path):
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db, name="a") as run:
        run.log_step(1, loss=1.0)
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import duckdb,time; c=duckdb.connect({str(db)!r}); print('ok', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        res = cli("sql", "SELECT 1", db=db)
        assert res.returncode == 1
        assert "locked by" in res.stderr and f"PID {holder.pid}" in res.stderr
    finally:
        holder.kill()
        holder.wait()


def test_schema_dictionary_documents_every_column():
    res = cli("schema", "--format", "markdown")
    assert res.returncode == 0
    from schema import DATA_TABLES

    for table in DATA_TABLES:
        for col in table.columns:
            assert col.comment, f"{table.name}.{col.name} is undocumented"
            assert f"`{col.name}`" in res.stdout
    assert "steps_to_target" in res.stdout and "run_summary" in res.stdout


def test_export_import_roundtrip_is_idempotent(tmp_path):
    db = tmp_path / "a.duckdb"
    with collector.start_run(db, name="a", sweep="s", config={"x": [1, 2]}) as run:
        run.log_step(1, loss=1.0)
        run.log_eval(1, split="test", loss=1.0, accuracy=0.5)
    assert cli("export", str(tmp_path / "out"), db=db).returncode == 0
    db2 = tmp_path / "b.duckdb"
    for _ in range(2):
        res = cli("import", str(tmp_path / "out"), db=db2)
        assert res.returncode == 0, res.stderr
    q = "SELECT * REPLACE (started_at::VARCHAR AS started_at, ended_at::VARCHAR AS ended_at, heartbeat_at::VARCHAR AS heartbeat_at) FROM runs"
    assert _q(db, q) == _q(db2, q)
    assert _q(db2, "SELECT count(*) FROM steps") == [(1,)]
