"""End-to-end in real Chromium (the server as users run it): grouped bands on Curves equal the min/max of
their members computed here from the store; the run page opens by URL and from a click on a curve; a
plot's CSV export is exactly the drawn data, and its full-resolution CSV is exactly the stored rows.

Store: both shipped sample sweeps (digits: 2 seeds per cell; charlm: AdamW, tokens, curvature).
Needs Debian's chromium + chromium-driver; skipped without them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from tests.browser_helpers import (
    Server,
    chromium_paths,
    dash_idle,
    make_driver,
    severe_console_errors,
    wait_for,
)

pytestmark = [pytest.mark.browser, pytest.mark.skipif(chromium_paths() is None, reason="chromium not installed")]


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_store) -> Path:
    return sample_store(tmp_path_factory.mktemp("runpage") / "runs.duckdb", ("sample_runs", "sample_runs/charlm"))


@pytest.fixture(scope="module")
def server(store):
    srv = Server(store)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(downloads):
    d = make_driver()
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield d
    d.quit()


def _sql(store: Path, query: str) -> pl.DataFrame:
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.sql(query).pl()
    finally:
        con.close()


def _settle(driver, css: str, timeout: float = 40.0) -> None:
    wait_for(lambda: driver.find_elements("css selector", css), timeout, what=css)
    wait_for(lambda: dash_idle(driver), timeout, what="callbacks to settle")
    time.sleep(0.5)


def _select(driver, server, run_ids: list[str], path: str, ready: str) -> None:
    """Open `path` with these runs selected (the selection lives in sessionStorage, as the Runs page keeps it)."""
    driver.get(server.url + "/healthz")  # any page of the origin shares its sessionStorage
    driver.execute_script("window.sessionStorage.setItem('selected-runs', JSON.stringify(arguments[0]));", run_ids)
    driver.get(server.url + path)
    _settle(driver, ready)


def _traces(driver, graph: str) -> list[dict]:
    return driver.execute_script(
        "var g = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');"
        "return g.data.map(function (t) { return {name: t.name, meta: t.meta || null, x: Array.from(t.x || []),"
        " y: Array.from(t.y || [])}; });", graph)


def _choose(driver, dropdown_id: str, text: str) -> None:
    """Pick an option of a dcc.Dropdown (Dash 4: a button opening a listbox elsewhere in the page)."""
    button = driver.find_element("css selector", f"#{dropdown_id}")
    button.click()
    popup = wait_for(lambda: driver.find_element("id", button.get_attribute("aria-controls")), 10, what="options")
    wait_for(lambda: any(o.text == text for o in popup.find_elements("css selector", "[role='option']")), 10,
             what=f"option {text}")
    next(o for o in popup.find_elements("css selector", "[role='option']") if o.text == text).click()
    driver.find_element("css selector", "body").send_keys("\ue00c")  # Escape closes the list


def _cells(store: Path, lrs: tuple[float, ...], batches: tuple[int, ...]) -> pl.DataFrame:
    return _sql(store, f"SELECT run_id, batch_size, lr, seed FROM runs WHERE sweep = 'digits-sample' "
                       f"AND batch_size IN {batches} AND lr IN {lrs} ORDER BY run_id")


def test_grouped_band_is_the_min_max_of_its_members(server, driver, store):
    """Test loss against examples, grouped by lr: each band edge is the min/max over its members' evaluations,
    interpolated onto the band's x values, computed here from the store's evals rows."""
    runs = _cells(store, (0.3, 0.9487), (16, 512))
    assert runs.height == 8
    _select(driver, server, runs["run_id"].to_list(), "/curves?metric=test_loss", "#curves-graph .main-svg")
    driver.find_element("css selector", "#curves-x input[value='examples']").click()
    _settle(driver, "#curves-graph .main-svg")
    _choose(driver, "curves-group", "lr")
    wait_for(lambda: any((t["meta"] or {}).get("role") == "max" for t in _traces(driver, "curves-graph")), 30,
             what="band traces")
    _settle(driver, "#curves-graph .main-svg")
    assert "members interpolated linearly" in driver.find_element("css selector", "#curves-note").text
    evals = _sql(store, "SELECT run_id, examples, loss FROM evals WHERE split = 'test' ORDER BY run_id, step")
    bands = {}
    for t in _traces(driver, "curves-graph"):
        meta = t["meta"] or {}
        if meta.get("role") in ("min", "max", "mean"):
            bands.setdefault(tuple(meta["members"]), {})[meta["role"]] = t
    assert len(bands) == 2
    for members, edges in bands.items():
        assert sorted(members) == sorted(runs.filter(pl.col("lr") == runs.filter(
            pl.col("run_id") == members[0])["lr"][0])["run_id"].to_list())
        own = [evals.filter(pl.col("run_id") == m) for m in members]
        x = np.array(edges["max"]["x"], dtype=float)
        assert x.min() == pytest.approx(max(o["examples"].min() for o in own))  # the overlap, no further
        assert x.max() == pytest.approx(min(o["examples"].max() for o in own))
        ys = np.vstack([np.interp(x, o["examples"].to_numpy().astype(float), o["loss"].to_numpy()) for o in own])
        np.testing.assert_allclose(edges["min"]["y"], ys.min(axis=0), rtol=1e-9)
        np.testing.assert_allclose(edges["max"]["y"], ys.max(axis=0), rtol=1e-9)
        np.testing.assert_allclose(edges["mean"]["y"], ys.mean(axis=0), rtol=1e-9)
    assert severe_console_errors(driver) == []


def test_run_page_by_url_and_from_a_click_on_curves(server, driver, store):
    rec = _sql(store, "SELECT run_id, name, git_commit, host, config FROM runs WHERE task = 'charlm' ORDER BY run_id LIMIT 1")
    rid = rec["run_id"][0]
    driver.get(server.url + f"/run/{rid}")
    _settle(driver, "#run-title")
    assert driver.find_element("css selector", "#run-title").text == rec["name"][0]
    assert driver.title == f"batchscope · run {rid}"
    prov = driver.find_element("css selector", "#run-provenance").text
    assert rec["git_commit"][0] in prov and rec["host"][0] in prov and str(store) in prov
    config = driver.find_element("css selector", "#run-config").text
    assert all(k in config for k in json.loads(rec["config"][0]))
    truth = _sql(store, f"SELECT b_noise FROM b_noise_summary(run_ids := ['{rid}'])")["b_noise"][0]
    assert float(driver.find_element("css selector", "#run-b-noise").get_attribute("title")) == pytest.approx(truth, rel=1e-12)
    scalars = driver.find_element("css selector", "#run-scalars").text
    assert "sharpness" in scalars and "b_simple_adam" in scalars
    assert driver.find_elements("css selector", "#run-curvature .main-svg")
    assert severe_console_errors(driver) == []

    # a real mouse click on a point of the one curve drawn opens that run's page
    other = _cells(store, (0.3,), (64,))["run_id"][0]
    _select(driver, server, [other], "/curves", "#curves-graph .main-svg")
    driver.execute_script("window.scrollTo(0, 0);")
    dx, dy = driver.execute_script(
        "var g = document.querySelector('#curves-graph .js-plotly-plot'); var L = g._fullLayout;"
        "var t = g._fullData.filter(function (d) { return d.meta && d.meta.run_id && d.hoverinfo !== 'skip'; })[0];"
        "var i = Math.floor(t.x.length / 2); var r = g.getBoundingClientRect();"
        "return [L.xaxis._offset + L.xaxis.c2p(t.x[i]) - r.width / 2, L.yaxis._offset + L.yaxis.c2p(t.y[i]) - r.height / 2];")
    from selenium.webdriver.common.action_chains import ActionChains

    def click_the_point() -> bool:  # again if a slow browser had not registered the hover before the click
        if not driver.current_url.endswith(f"/run/{other}"):
            plot = driver.find_element("css selector", "#curves-graph .js-plotly-plot")
            ActionChains(driver).move_to_element_with_offset(plot, int(dx), int(dy)).pause(0.5).click().perform()
            time.sleep(2.0)
        return driver.current_url.endswith(f"/run/{other}")

    wait_for(click_the_point, 40, what="the run page after a click")
    _settle(driver, "#run-title")
    name = _sql(store, f"SELECT name FROM runs WHERE run_id = '{other}'")["name"][0]
    assert driver.find_element("css selector", "#run-title").text == name


def _download(driver, downloads: Path, button_css: str, name: str) -> Path:
    target = downloads / name
    target.unlink(missing_ok=True)
    driver.find_element("css selector", button_css).click()
    wait_for(lambda: target.exists() and target.stat().st_size > 0 and not list(downloads.glob("*.crdownload")),
             30, what=f"download {name}")
    return target


def test_plot_csv_is_the_drawn_data_and_full_resolution_the_stored_rows(server, driver, store, downloads):
    runs = _cells(store, (0.3, 0.9487), (8, 16, 1024))["run_id"].to_list()  # 12 runs: B=8's 1,500 steps downsampled
    _select(driver, server, runs, "/curves", "#curves-graph .main-svg")  # train loss per step, smoothed
    drawn = driver.execute_script(
        "var g = document.querySelector('#curves-graph .js-plotly-plot'); var out = [];"
        "g._fullData.forEach(function (t) { if (t.visible !== true) return; (t.x || []).forEach(function (x, i) {"
        " if (t.y[i] !== null && t.y[i] !== undefined) out.push([t.name, t.meta.run_id, x, t.y[i]]); }); });"
        "return out;")
    csv = pl.read_csv(_download(driver, downloads, "button[id*='plot-export-csv'][id*='curves-graph']",
                                "batchscope-curves.csv"))
    assert csv.columns == ["series", "run_id", "step", "train loss (per step)"]
    assert csv.rows() == [tuple(r[:2]) + (float(r[2]), float(r[3])) for r in drawn]
    assert set(csv["run_id"]) == set(runs)

    full = pl.read_csv(_download(driver, downloads, "button[id*='plot-export-full'][id*='curves-graph']",
                                 "batchscope-curves-full.csv"))
    stored = _sql(store, f"SELECT run_id, step, examples, wall_time, loss FROM steps WHERE run_id IN {tuple(runs)} "
                         "ORDER BY run_id, step")
    assert full.select(stored.columns).rows() == stored.rows()
    assert full.height > csv.filter(~pl.col("series").str.ends_with("(raw)")).height  # more than drawn: not downsampled
    assert full["tokens"].null_count() == full.height  # digits counts no tokens

    svg = _download(driver, downloads, "button[id*='plot-export-svg'][id*='curves-graph']", "batchscope-curves.svg")
    assert svg.read_text().lstrip().startswith("<svg")
    assert severe_console_errors(driver) == []


def test_noise_page_shows_preconditioned_b_simple_and_b_noise_from_sql(server, driver, store):
    """On the charlm sweep (AdamW, --curvature) the Noise page's cards are SQL noise_scale_adam's and
    b_noise_summary's numbers, and the page explains both."""
    runs = _sql(store, "SELECT run_id FROM runs WHERE sweep = 'charlm-sample' ORDER BY run_id")["run_id"].to_list()
    _select(driver, server, runs, "/noise", "#noise-bnoise-end[title]")
    ids = str(runs)
    adam = _sql(store, f"SELECT run_id, arg_max(b_simple, step) FILTER (WHERE b_simple IS NOT NULL) AS b "
                       f"FROM noise_scale_adam(run_ids := {ids}) GROUP BY run_id")
    bn = _sql(store, f"SELECT * FROM b_noise_summary(run_ids := {ids}) WHERE b_noise IS NOT NULL "
                     "AND b_simple_same_batches IS NOT NULL")
    card = lambda css: float(driver.find_element("css selector", css).get_attribute("title"))  # noqa: E731
    assert card("#noise-bsimple-adam-end") == pytest.approx(float(adam["b"].median()), rel=1e-9)
    assert card("#noise-bnoise-end") == pytest.approx(float(bn["b_noise"].median()), rel=1e-9)
    below = int((bn["b_noise"] <= bn["b_simple_same_batches"]).sum())
    page = driver.find_element("css selector", "body").text
    assert f"in {below} of {bn.height}" in page
    assert "Preconditioned B_simple (dashed)" in page and "B_noise (diamonds)" in page
    names = {t["name"] for t in _traces(driver, "noise-over-training")}
    assert any(n.endswith("preconditioned") for n in names) and any(n.endswith("B_noise") for n in names)
    assert severe_console_errors(driver) == []
