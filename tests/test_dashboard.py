"""Dashboard unit tests: queries (downsampling, cache), the SQL console's protections, auth, page functions.

No browser here (see test_dashboard_browser.py). A small synthetic store is built once per session.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from dashboard import console, queries
from dashboard.synthetic import make_store


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("dash") / "runs.duckdb"
    make_store(db, n_runs=40, steps=1500, seeds=1, running=1)
    return db


@pytest.fixture(scope="session")
def app(store):
    from dashboard.app import create_app

    return create_app(store)


# --------------------------------------------------------------------------------------------- queries


def test_overview_and_run_table(store):
    ov = queries.overview(store)
    assert ov.exists and ov.runs == 40 and ov.sweeps == ("synthetic-sweep",)
    table = queries.run_table(store)
    assert table.height == 40
    assert {"run_id", "status", "batch_size", "lr", "steps", "best_loss", "gap_loss"} <= set(table.columns)


def test_missing_store_is_not_an_error(tmp_path):
    ov = queries.overview(tmp_path / "nothing.duckdb")
    assert not ov.exists and ov.empty and ov.error is None


def test_step_curves_downsample_in_duckdb(store):
    ids = queries.run_table(store).filter(pl.col("steps") == 1500)["run_id"].head(3).to_list()
    full = queries.step_curves(store, ids, "loss", "step", max_points=5000)
    small = queries.step_curves(store, ids, "loss", "step", max_points=200)
    for rid in ids:
        f = full.filter(pl.col("run_id") == rid)
        s = small.filter(pl.col("run_id") == rid)
        assert f.height == 1500 and (f["n"] == 1).all()
        assert s.height <= 201
        assert int(s["n"].sum()) == 1500  # every finite step is in exactly one bucket
        # bucket means are means: the overall mean is preserved when weighted by n
        assert np.isclose((s["y"] * s["n"]).sum() / s["n"].sum(), f["y"].mean())
        assert (s["y_min"] <= s["y"]).all() and (s["y"] <= s["y_max"]).all()


def test_step_curves_rejects_unknown_columns(store):
    with pytest.raises(ValueError):
        queries.step_curves(store, ["x"], "loss; DROP TABLE runs", "step")
    with pytest.raises(ValueError):
        queries.eval_curves(store, ["x"], "loss", "1; SELECT 1")


def test_eval_curves_x_axes(store):
    rid = queries.run_table(store)["run_id"][0]
    for x in queries.X_AXES:
        ev = queries.eval_curves(store, [rid], "loss", x, ("test",))
        assert ev.height > 0 and ev["x"].null_count() == 0


def test_cache_follows_store_version(tmp_path):
    db = tmp_path / "c.duckdb"
    make_store(db, n_runs=3, steps=50, seeds=1)
    assert queries.overview(db).runs == 3
    ids = queries.run_table(db)["run_id"].to_list()
    first = queries.step_curves(db, ids, "loss", "step")
    hits = queries.CACHE.hits
    assert queries.step_curves(db, ids, "loss", "step") is first  # unchanged store: served from memory
    assert queries.CACHE.hits == hits + 1
    time.sleep(0.01)
    make_store(db, n_runs=2, steps=50, seeds=1, sweep="second", seed=7)  # a writer appends
    assert queries.overview(db).runs == 5  # new version, re-read


# --------------------------------------------------------------------------------------------- console


@pytest.mark.parametrize("sql", [
    "INSERT INTO runs (run_id, name, status) VALUES ('x', 'x', 'finished')",
    "UPDATE runs SET lr = 1",
    "DELETE FROM steps",
    "CREATE TABLE t AS SELECT 1",
    "CREATE TEMP TABLE t AS SELECT 1",
    "DROP TABLE runs",
    "ATTACH '/tmp/other.duckdb' AS o",
    "COPY runs TO '/tmp/runs.csv'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA enable_external_access",
    "EXPORT DATABASE '/tmp/x'",
    "select 1; delete from runs",
    "/* sneaky */ insert into runs (run_id, name, status) values ('y', 'y', 'finished')",
])
def test_console_rejects_writes_and_side_effects(store, sql):
    res = console.run_console(store, sql)
    assert not res.ok and res.frame is None
    assert "Traceback" not in res.message
    with duckdb.connect(str(store), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 40


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    "WITH x AS (SELECT * FROM read_csv_auto('/etc/hosts')) SELECT * FROM x",
])
def test_console_has_no_file_or_network_access(store, sql):
    res = console.run_console(store, sql)
    assert not res.ok
    assert "root:" not in res.message and "Traceback" not in res.message


def test_console_runs_reads_with_row_and_time_limits(store):
    ok = console.run_console(store, "SELECT name, batch_size FROM run_summary ORDER BY name")
    assert ok.ok and ok.frame.height == 40 and ok.columns == ["name", "batch_size"]
    big = console.run_console(store, "SELECT * FROM range(1000000)", row_limit=1000)
    assert big.ok and big.truncated and big.frame.height == 1000 and "limit" in big.message
    t0 = time.perf_counter()
    slow = console.run_console(store, "SELECT count(*) FROM steps a, steps b, steps c", time_limit_s=1.0)
    assert not slow.ok and "time limit" in slow.message
    assert time.perf_counter() - t0 < 20  # 1 s + the worker's hard-kill fallback (9 s) on a loaded machine
    bad = console.run_console(store, "SELEC 1")
    assert not bad.ok and "syntax error" in bad.message.lower() and "Traceback" not in bad.message
    missing = console.run_console(store, "SELECT * FROM no_such_table")
    assert not missing.ok and "no_such_table" in missing.message


def test_console_example_queries_run(store):
    for name, sql in console.EXAMPLE_QUERIES.items():
        res = console.run_console(store, sql)
        assert res.ok, (name, res.message)


# --------------------------------------------------------------------------------------------- auth


def _auth_app(spec: str):
    import flask

    from dashboard.app import install_auth

    server = flask.Flask("t")
    server.add_url_rule("/", "index", lambda: "hello")
    server.add_url_rule("/healthz", "healthz", lambda: "ok")
    install_auth(server, spec)
    return server.test_client()


def test_token_auth():
    c = _auth_app("token:s3cret")
    assert c.get("/").status_code == 401
    assert c.get("/healthz").status_code == 200
    assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = c.get("/?token=s3cret")
    assert r.status_code == 302 and "batchscope_session=" in r.headers["Set-Cookie"]
    assert "s3cret" not in r.headers["Set-Cookie"]  # an HMAC of the secret, never the secret
    assert c.get("/").status_code == 200  # the cookie is remembered


def test_basic_auth():
    c = _auth_app("alice:pw")
    r = c.get("/")
    assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"]
    bad = base64.b64encode(b"alice:nope").decode()
    good = base64.b64encode(b"alice:pw").decode()
    assert c.get("/", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    assert c.get("/", headers={"Authorization": f"Basic {good}"}).status_code == 200


def test_parse_auth_rejects_nonsense():
    from dashboard.app import parse_auth

    for spec in ("token:", "justaword", ":pw", "user:"):
        with pytest.raises(ValueError):
            parse_auth(spec)


# --------------------------------------------------------------------------------------------- pages


def test_debiased_ema():
    from dashboard.pages.curves import debiased_ema

    assert np.allclose(debiased_ema(np.full(10, 3.0), 0.9), 3.0)  # no bias towards 0 at the start
    y = np.array([1.0, 2.0, 3.0])
    assert np.allclose(debiased_ema(y, 0.0), y)
    # a bucket standing for 2 steps decays like 2 single steps of the same value
    a = debiased_ema(np.array([1.0, 5.0, 5.0]), 0.8)
    b = debiased_ema(np.array([1.0, 5.0]), 0.8, n=np.array([1, 2]))
    assert np.isclose(a[-1], b[-1])


def test_curves_figure_is_bounded(app, store):
    from dashboard.pages.curves import POINT_BUDGET, curves_figure

    ids = queries.run_table(store)["run_id"].to_list()
    fig, _note = curves_figure(store, ids, "loss", "examples", smoothing=0.8, log_y=True)
    lines = [t for t in fig["data"] if t["mode"] == "lines" and t.get("hoverinfo") != "skip"]
    assert len(lines) == 40
    assert sum(len(t["x"]) for t in lines) <= POINT_BUDGET * 1.2
    json.dumps(fig, allow_nan=False)
    fig2, _ = curves_figure(store, ids[:2], "test_accuracy", "wall_time")
    assert len(fig2["data"]) == 2
    empty, _ = curves_figure(store, [], "loss", "step")
    assert not empty["data"]


def test_runs_rows_are_json_clean(app, store):
    from dashboard.pages.runs import runs_rows, sweep_summary

    rows = runs_rows(store)
    assert len(rows) == 40
    json.dumps(rows, allow_nan=False)
    assert sweep_summary(store)[0]["runs"] == 40


def test_sql_view(app, store):
    from dashboard.pages.sql import console_view

    v = console_view(store, "SELECT run_id, started_at, config FROM runs LIMIT 3")
    assert v["ok"] and len(v["rowData"]) == 3 and [c["field"] for c in v["columnDefs"]] == ["run_id", "started_at", "config"]
    e = console_view(store, "DROP TABLE runs")
    assert not e["ok"] and "not allowed" in e["message"]


def test_tradeoff_view_recovers_bcrit_and_explains(app, store):
    from dashboard.pages.tradeoff import render, tradeoff_view
    from dashboard.synthetic import B_NOISE

    ids = queries.run_table(store)["run_id"].to_list()
    view = tradeoff_view(store, ids)
    fit = view["fit"]
    assert fit.ok, fit.reason
    assert 0.5 * B_NOISE < fit.b_crit < 2 * B_NOISE  # synthetic runs follow S(B) = S_min (1 + B_noise / B)
    assert fit.b_crit_ci[0] <= fit.b_crit <= fit.b_crit_ci[1]
    stats, sentence, *_ = render(view, "sweep", "train_loss")
    assert "B_crit" in json.dumps(sentence.to_plotly_json(), default=str)
    json.dumps(view["frontier"], allow_nan=False)
    json.dumps(view["vs_target"], allow_nan=False)
    # a lower target from the slider, and a degenerate scope: a single run cannot make a frontier
    assert tradeoff_view(store, ids, view["target"] * 0.8)["fit"] is not None
    one = tradeoff_view(store, ids[:1])
    assert one["fit"] is None or not one["fit"].ok


def test_tradeoff_in_tokens_is_the_same_fit_scaled(app, store, tmp_path):
    """Count: tokens shows the examples fit with every batch size, E_min and B_crit times the sweep's one
    number of tokens per example (S_min unchanged), in the figures and the sentence too; a sweep where a run
    counts no tokens, or runs count different numbers, stays in examples and says why."""
    import shutil

    from dashboard.pages.tradeoff import render, tradeoff_view

    db = tmp_path / "runs.duckdb"
    shutil.copy(store, db)
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE runs SET tokens_per_step = batch_size * 64")
    ids = queries.run_table(db)["run_id"].to_list()
    ex, tok = tradeoff_view(db, ids), tradeoff_view(db, ids, count="tokens")
    assert ex["fit"].ok and tok["units"] == (64.0, "tokens") and tok["units_note"] is None
    assert tok["fit"].b_crit == pytest.approx(64 * ex["fit"].b_crit, rel=1e-12)
    assert tok["fit"].e_min == pytest.approx(64 * ex["fit"].e_min, rel=1e-12)
    assert tok["fit"].s_min == ex["fit"].s_min and tok["fit"].b_crit_ci[1] == pytest.approx(64 * ex["fit"].b_crit_ci[1])
    assert tok["b_simple"] == pytest.approx(64 * ex["b_simple"], rel=1e-12)
    assert tok["frontier"]["layout"]["yaxis"]["title"]["text"] == "tokens to target E"
    best_ex, best_tok = ex["frontier"]["data"][-3], tok["frontier"]["data"][-3]  # best LR per batch size
    np.testing.assert_allclose(np.asarray(best_tok["y"]), 64 * np.asarray(best_ex["y"]))
    np.testing.assert_allclose(np.asarray(tok["vs_batch"]["data"][0]["x"]), 64 * np.asarray(ex["vs_batch"]["data"][0]["x"]))
    stats, sentence, notes, *_ = render(tok, "sweep", "train_loss")
    text = json.dumps(sentence.to_plotly_json(), default=str)
    assert "tokens" in text and "sequences" in text
    with duckdb.connect(str(db)) as con:  # one run with another context: no single token count
        con.execute("UPDATE runs SET tokens_per_step = batch_size * 32 WHERE run_id = $id", {"id": ids[0]})
    mixed = tradeoff_view(db, ids, count="tokens")
    assert mixed["units"] == (1.0, "examples") and "different numbers of tokens" in mixed["units_note"]
    assert mixed["fit"].b_crit == pytest.approx(ex["fit"].b_crit, rel=1e-12)
    assert "different numbers" in json.dumps(render(mixed, "sweep", "train_loss")[2], default=str)


def test_noise_generalization_lr_batch_views(app, store):
    from dashboard.pages.generalization import generalization_view
    from dashboard.pages.lr_batch import lr_batch_view
    from dashboard.pages.noise import noise_view

    ids = queries.run_table(store)["run_id"].to_list()
    nv = noise_view(store, ids, "examples")
    assert nv["over"]["data"] and nv["vs_loss"]["data"]
    json.dumps(nv["over"], allow_nan=False)
    gv = generalization_view(store, ids, "end", "gap_loss")
    assert gv["batch"]["data"] and gv["noise"]["data"]
    lv = lr_batch_view(store, ids, "final_loss", "base_lr")
    assert lv["heatmap"]["layout"]["yaxis"]["type"] == "log"  # base LR η/B: every cell at its own η/B (pages-b)
    cells = lv["heatmap"]["data"][0]
    lr_of = {r["run_id"]: r for r in queries.run_table(store).to_dicts()}
    assert min(cells["y"]) >= min(r["lr"] / r["batch_size"] for r in lr_of.values()) * (1 - 1e-9)
    assert any(t.get("name") == "diverged" for t in lv["heatmap"]["data"])  # diverged cells are marked
    for view in (noise_view(store, []), generalization_view(store, []), lr_batch_view(store, [])):
        assert all(not f["data"] for f in view.values() if isinstance(f, dict) and "data" in f)


def test_cli_rejects_bad_arguments(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "dashboard", *args], capture_output=True, text=True, timeout=60)

    assert run("--help").returncode == 0
    bad_auth = run("--auth", "justaword", "--db", str(tmp_path / "x.duckdb"))
    assert bad_auth.returncode != 0 and "--auth" in bad_auth.stderr and "Traceback" not in bad_auth.stderr
    folder = run("--db", str(tmp_path))
    assert folder.returncode != 0 and "directory" in folder.stderr and "Traceback" not in folder.stderr
