"""Every page at 1280x720 and 1920x1080 in real Chromium: every input, radio option, dropdown and button
is clickable (the element at its centre is itself or inside it), no text overlaps a control or other
text, no console errors; every control is reached by the Tab key and shows where the focus is.

One server on both sample sweeps (sample_runs/ and sample_runs/charlm), one browser, each page loaded
once and checked at both sizes. The pure parts behind the fixes (batch-size colours, the Tradeoff
slider's grid and marks, the Generalization batch axis) are checked against computed ground truth.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.browser_helpers import (
    ROOT,
    Server,
    chromium_paths,
    dash_idle,
    make_driver,
    severe_console_errors,
    wait_for,
)

SIZES = ((1280, 720), (1920, 1080))
MAX_TABS = 120
PAGES = ["/", "/curves", "/noise", "/tradeoff", "/generalization", "/lr-batch", "/sql", "/welcome", "/run/"]

# --- colours: neighbouring batch sizes must look different ---------------------------------------------


def _lab(hex_color: str) -> np.ndarray:
    """CIELAB (D65) of an sRGB colour, from the standard formulas."""
    rgb = np.array([int(hex_color.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)])
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ lin
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_consecutive_batch_sizes_have_distinguishable_colours():
    """CIELAB ΔE between B and 2B over B = 1 ... 8192 (a ΔE near 2 is a just-noticeable difference; the
    old Viridis scale gave 9 between 1 and 2 and ~13 between 8, 16 and 32), and each colour reads on white."""
    from dashboard.theme import batch_color

    labs = [_lab(batch_color(2 ** k)) for k in range(14)]
    gaps = [float(np.linalg.norm(a - b)) for a, b in zip(labs, labs[1:], strict=False)]
    assert min(gaps) > 25, [round(g, 1) for g in gaps]
    assert all(lab[0] < 75 for lab in labs)  # L* well below white's 100: lines stay visible
    # between powers of two the colour moves monotonically from one anchor to the next
    lo, mid, hi = (_lab(batch_color(b)) for b in (64, 90, 128))
    assert np.linalg.norm(mid - lo) < np.linalg.norm(hi - lo) and np.linalg.norm(mid - hi) < np.linalg.norm(hi - lo)


# --- pure helpers behind the fixes --------------------------------------------------------------------


@pytest.mark.parametrize(("lo", "hi", "default"), [(-1.3, 0.74, -1.12), (0.2, 0.4, 0.2), (-3.0, 1.0, 0.9)])
def test_tradeoff_slider_grid_passes_through_the_default(lo, hi, default):
    from dashboard.pages.tradeoff import KEY_STEP, MARK_GAP, MAX_STEPS, slider_grid, slider_marks

    a, b, step = slider_grid(lo, hi, default, KEY_STEP)
    k = (default - a) / step
    assert abs(k - round(k)) < 1e-9  # the default is on the grid the slider snaps to
    assert lo - 1e-12 <= a <= default <= b <= hi + 1e-12 and b > hi - step - 1e-12
    assert step >= KEY_STEP - 1e-12 and (b - a) / step <= MAX_STEPS + 1e-9
    assert 10 ** step == pytest.approx(1.05, rel=0.1) or (b - a) / step > MAX_STEPS - 1  # ~5 % per arrow key
    marks = slider_marks(a, b, default, lambda v: 10 ** v)
    numeric = [float(x) for x, m in marks.items() if not isinstance(m, dict)]
    assert all(abs(x - default) > MARK_GAP * (b - a) for x in numeric)
    assert sum(isinstance(m, dict) for m in marks.values()) == 1
    # the default's label is centred on its mark, or shifted inwards near an end (never sticking out)
    shift = float(next(m for m in marks.values() if isinstance(m, dict))["style"]["transform"][11:-2])
    frac = (default - a) / (b - a)
    assert -100 <= shift <= 0 and (shift == -50 or frac < 0.08 or frac > 0.92)


def test_generalization_lone_run_sits_on_its_batch_size():
    from dashboard.pages.generalization import batch_axis, spread

    assert spread([32.0]).tolist() == [32.0]
    x = spread([16.0, 16.0, 16.0, 64.0])
    assert x[3] == 64.0 and len(set(x[:3])) == 3 and np.all(np.abs(np.log(x[:3] / 16)) <= 0.06 + 1e-12)
    ax = batch_axis([32.0])
    lo, hi = (10 ** v for v in ax["range"])
    assert lo < 32 / 1.5 and hi > 32 * 1.5 and ax["tickvals"] == [32.0]  # not a 32-32.7 sliver


# --- the browser: clickable, not overlapping, keyboard-reachable ---------------------------------------

CHECK_JS = r"""
var out = [];
if (document.documentElement.scrollWidth > document.documentElement.clientWidth + 1) {
  out.push('page wider than the window: ' + document.documentElement.scrollWidth + ' px');
}
function vis(el) {  // drawn: not hidden (a closed <details> included), not a 1-px screen-reader-only box
  var r = el.getBoundingClientRect();
  if (!(r.width > 2 && r.height > 2)) return false;
  return el.checkVisibility({contentVisibilityAuto: true, opacityProperty: true, visibilityProperty: true});
}
function name(el) {
  var t = (el.innerText || el.value || el.getAttribute('aria-label') || '').trim().slice(0, 30);
  return el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + ' "' + t + '"';
}
function inGrid(el) { return !!el.closest('.ag-root-wrapper'); }
// a radio or checkbox is used through its label
function box(el) { return (el.type === 'radio' || el.type === 'checkbox') && el.closest('label') ? el.closest('label') : el; }
var ctrls = Array.from(document.querySelectorAll(
    'input, button, select, textarea, [role=combobox], [role=slider], a.nav-link')).filter(function (el) {
  if (el.closest('.modebar')) return false;
  if (inGrid(el) && !el.matches('input.ag-checkbox-input, .ag-floating-filter input')) return false;
  return vis(box(el));
});
ctrls.forEach(function (el) {
  var t = box(el);
  t.scrollIntoView({block: 'center', inline: 'center'});
  var r = t.getBoundingClientRect();
  var hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  if (!hit || !(hit === t || t.contains(hit))) out.push('covered: ' + name(el) + ' by ' + (hit ? name(hit) : 'nothing'));
});
window.scrollTo(0, 0);
function rect(r) { return {l: r.left + scrollX, t: r.top + scrollY, r: r.right + scrollX, b: r.bottom + scrollY}; }
function overlap(a, b) { return Math.min(a.r, b.r) - Math.max(a.l, b.l) > 2 && Math.min(a.b, b.b) - Math.max(a.t, b.t) > 2; }
var texts = [], walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT), n;
while ((n = walker.nextNode())) {
  var p = n.parentElement;
  if (!n.textContent.trim() || !p || !vis(p) || p.closest('svg, .modebar, .ag-root-wrapper, script, style')) continue;
  var rg = document.createRange(); rg.selectNodeContents(n);
  Array.from(rg.getClientRects()).forEach(function (r) { if (r.width > 0.5 && r.height > 0.5) texts.push({el: p, r: rect(r)}); });
}
var boxes = ctrls.map(function (el) { var t = box(el); return {el: t, r: rect(t.getBoundingClientRect())}; });
function related(a, b) { return a === b || a.contains(b) || b.contains(a); }
texts.forEach(function (t) {
  boxes.forEach(function (b) { if (!related(t.el, b.el) && overlap(t.r, b.r)) out.push('text over control: ' + name(t.el) + ' / ' + name(b.el)); });
});
for (var i = 0; i < texts.length; i++) for (var j = i + 1; j < texts.length; j++) {
  if (!related(texts[i].el, texts[j].el) && overlap(texts[i].r, texts[j].r)) out.push('text over text: ' + name(texts[i].el) + ' / ' + name(texts[j].el));
}
// a chart's title must not run under Plotly's toolbar (shown on hover; its box is there all the time)
document.querySelectorAll('.js-plotly-plot').forEach(function (g) {
  var t = g.querySelector('.gtitle'), m = g.querySelector('.modebar');
  if (t && m && overlap(rect(t.getBoundingClientRect()), rect(m.getBoundingClientRect()))) {
    out.push('title under the toolbar: ' + (g.closest('[id]') || g).id + ' "' + t.textContent.slice(0, 40) + '"');
  }
});
return out;
"""

# record every element the focus visits (and whether it shows a focus ring), before pressing Tab
FOCUS_RECORD_JS = r"""
window.__focus = [];
document.addEventListener('focusin', function (e) {
  var el = e.target, s = getComputedStyle(el);
  var ring = (s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0) || s.boxShadow !== 'none';
  window.__focus.push({el: el, ring: ring, grid: !!el.closest('.ag-root-wrapper')});
}, true);
document.activeElement && document.activeElement.blur();
window.scrollTo(0, 0);
return Array.from(document.querySelectorAll('a[href], button, input, select, textarea, [tabindex]')).filter(
  function (el) { return !el.closest('.ag-root-wrapper, .modebar') && el.tabIndex >= 0; }).length;
"""

FOCUS_CHECK_JS = r"""
var seen = window.__focus || [], out = [];
function group(el) { return el.type === 'radio' ? (el.closest('[id]') || el.parentElement) : el; }
var reached = new Set(seen.map(function (f) { return group(f.el); }));
var grid = seen.some(function (f) { return f.grid; });
Array.from(document.querySelectorAll('input, button, select, textarea, [role=combobox], [role=slider], a.nav-link'))
  .forEach(function (el) {
    var r = el.getBoundingClientRect(), lab = el.closest('label');
    var shown = (r.width >= 1 && r.height >= 1) || (lab && lab.getBoundingClientRect().width >= 1);
    if (!shown || el.disabled || el.closest('.modebar')) return;
    if (el.closest('.ag-root-wrapper')) { if (!grid) out.push('grid not reached'); return; }
    if (!reached.has(group(el))) out.push('not reached by Tab: ' + el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + ' ' + (el.innerText || el.value || '').trim().slice(0, 30));
  });
seen.forEach(function (f) {
  if (!f.ring && !f.grid) out.push('no visible focus: ' + f.el.tagName.toLowerCase() + (f.el.id ? '#' + f.el.id : '') + ' ' + (f.el.innerText || '').trim().slice(0, 30));
});
return Array.from(new Set(out));
"""


SAMPLES = [ROOT / "sample_runs", ROOT / "sample_runs" / "charlm"]


def _import(sample_store, db: Path, folders: list[Path]) -> Path:
    if not all((f / "runs.parquet").exists() for f in folders):
        pytest.skip("sample_runs/ not shipped")
    return sample_store(db, tuple(str(f.relative_to(ROOT)) for f in folders))


@pytest.fixture(scope="module")
def samples_db(tmp_path_factory, sample_store) -> Path:
    """Both shipped sample sweeps: digits (SGD) and charlm (AdamW, with curvature)."""
    return _import(sample_store, tmp_path_factory.mktemp("samples") / "runs.duckdb", SAMPLES)


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_store):
    """The dashboard on a store holding only the digits sample: the Runs page offers the charlm one."""
    if chromium_paths() is None:
        pytest.skip("chromium not installed")
    db = _import(sample_store, tmp_path_factory.mktemp("layout") / "runs.duckdb", SAMPLES[:1])
    import duckdb

    con = duckdb.connect(str(db), read_only=True)  # before the server holds the file
    first_run = con.sql("SELECT min(run_id) FROM runs").fetchall()[0][0]
    con.close()
    srv = Server(db)
    srv.first_run = first_run
    yield srv
    srv.stop()


# --- the pages' numbers, in-process, against SQL -------------------------------------------------------


def _sweep_ids(db: Path, sweep: str) -> list[str]:
    from dashboard import queries

    queries.configure(db)
    t = queries.run_table(db)
    return t.filter(t["sweep"] == sweep)["run_id"].to_list()


def _stat_ids(stats) -> dict[str, str]:
    """{id of a stat card's value: its text}."""
    out = {}
    for card in stats:
        value = card.children[1]
        if getattr(value, "id", None):
            out[value.id] = value.children
    return out


def test_lr_batch_under_adam_shows_both_laws_and_which_fits(samples_db):
    from dashboard import analysis, sweeps
    from dashboard.analysis.adam_lr import adam_lr_scaling
    from dashboard.pages.lr_batch import lr_batch_view

    ids = _sweep_ids(samples_db, "charlm-sample")
    view = lr_batch_view(samples_db, ids)
    names = [t.get("name") or "" for t in view["lrfit"]["data"]]
    assert any(n.startswith("SGD") for n in names) and any(n.startswith("Adam") for n in names), names
    # the verdict is the analysis' own, on the same best LRs (the Tradeoff page's default target)
    tr = sweeps.target_range(samples_db, ids, "train_loss")
    best = analysis.best_per_batch(sweeps.hits_for(samples_db, ids, (sweeps.snap(tr.default),), "train_loss"))
    fit = adam_lr_scaling(best)
    cards = _stat_ids(view["stats"])
    assert cards["lrb-better"] == {"surge": "Adam's rise-and-fall law", "sgd": "SGD's law",
                                   "neither": "neither (a tie)"}[fit.better]
    text = str([n.children for n in view["notes"]])
    assert fit.comparison in text
    # an SGD sweep gets SGD's law only
    sgd = lr_batch_view(samples_db, _sweep_ids(samples_db, "digits-sample"))
    assert not any((t.get("name") or "").startswith("Adam") for t in sgd["lrfit"]["data"])
    assert "lrb-better" not in _stat_ids(sgd["stats"])


def test_generalization_sharpness_is_the_last_logged_value(samples_db):
    import duckdb

    from dashboard.pages.generalization import generalization_view

    ids = _sweep_ids(samples_db, "charlm-sample")
    fig = generalization_view(samples_db, ids)["sharpness"]
    runs = fig["data"][0]
    con = duckdb.connect(str(samples_db), read_only=True)
    try:
        rows = con.sql("SELECT r.batch_size, arg_max(s.value, s.step) FROM scalars s JOIN runs r USING (run_id) "
                       "WHERE s.name = 'sharpness' AND isfinite(s.value) AND r.sweep = 'charlm-sample' "
                       "GROUP BY s.run_id, r.batch_size").fetchall()
    finally:
        con.close()
    assert len(rows) == len(runs["y"]) > 0
    assert sorted(runs["y"]) == pytest.approx(sorted(v for _, v in rows), rel=1e-12)
    # drawn at its batch size (fanned out by at most 6 % among runs sharing it)
    for x, y in zip(runs["x"], runs["y"], strict=True):
        assert any(abs(np.log(x / b)) <= 0.06 + 1e-9 and y == pytest.approx(v, rel=1e-12) for b, v in rows)
    empty = generalization_view(samples_db, _sweep_ids(samples_db, "digits-sample"))["sharpness"]
    assert not empty["data"] and "--curvature" in empty["layout"]["annotations"][0]["text"]


def test_runs_rows_carry_provenance_and_run_links(samples_db):
    import duckdb

    from dashboard.pages.runs import column_defs, runs_rows

    rows = {r["run_id"]: r for r in runs_rows(samples_db)}
    con = duckdb.connect(str(samples_db), read_only=True)
    try:
        truth = con.sql("SELECT run_id, host, rank, world_size, launcher, attempt, git_commit FROM runs").fetchall()
    finally:
        con.close()
    for run_id, host, rank, world, launcher, attempt, commit in truth:
        r = rows[run_id]
        assert (r["host"], r["rank"], r["world_size"], r["launcher"], r["attempt"]) == (host, rank, world, launcher, attempt)
        assert r["git_commit"] == (None if commit is None else commit[:10] + ("-dirty" if commit.endswith("-dirty") else ""))
        assert r["run_href"] == f"/run/{run_id}"
    fields = [d["field"] for d in column_defs(list(rows.values()))]
    assert {"host", "launcher", "attempt", "git_commit"} <= set(fields)
    assert "job" not in fields  # no run has a job id: the column is left out


# --- the browser ------------------------------------------------------------------------------------------


def _settle(driver) -> None:
    wait_for(lambda: dash_idle(driver), 30, what="callbacks to settle")
    time.sleep(0.3)
    wait_for(lambda: dash_idle(driver), 30, what="callbacks to settle")


@pytest.mark.browser
@pytest.mark.slow  # ~30 s on an idle 2-core machine (9 pages, each loaded once), ~70 s under heavy load
def test_every_page_usable_at_both_sizes_and_by_keyboard(server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver = make_driver(*SIZES[0])
    problems: dict[str, list[str]] = {}
    try:
        # the Runs page offers the sample sweep the store lacks (charlm), and loads it
        driver.get(server.url + "/")
        offer = wait_for(lambda: driver.find_element("css selector", "#sample-offer"), 30, what="sample offer")
        assert "charlm-sample" in offer.text and "digits-sample" not in offer.text
        driver.find_element("css selector", "#runs-load-samples").click()
        wait_for(lambda: "charlm-sample" in driver.find_element("css selector", "#sweep-cards").text
                 and not driver.find_elements("css selector", "#sample-offer"), 90, what="charlm loaded")
        # a run's name opens its page, without touching the selection
        link = wait_for(lambda: driver.find_element("css selector", "#runs-grid a.run-link"), 30, what="run link")
        href = link.get_attribute("href")
        link.click()
        wait_for(lambda: driver.current_url == href, 30, what="run page")
        assert "/run/" in href  # a full page load: its badge renders after the URL changes
        wait_for(lambda: "no runs selected" in driver.find_element("css selector", "#selection-badge").text, 30,
                 what="the run page's selection badge, selection untouched")
        # ... and so does Enter on its focused cell (keyboard users reach cells, not the link inside)
        driver.back()
        _settle(driver)
        name_cell = "#runs-grid .ag-cell[col-id='name']"
        target = wait_for(lambda: driver.find_element("css selector", f"{name_cell} a.run-link"), 30,
                          what="name cell").get_attribute("href")

        def enter_on_the_name_cell() -> bool:  # found afresh each try: a grid refresh may replace the cell
            if driver.current_url != target:
                driver.execute_script("arguments[0].focus();", driver.find_element("css selector", name_cell))
                ActionChains(driver).send_keys(Keys.ENTER).perform()
                time.sleep(1.0)
            return driver.current_url == target

        wait_for(enter_on_the_name_cell, 60, what="run page by Enter")
        wait_for(lambda: "no runs selected" in driver.find_element("css selector", "#selection-badge").text, 30,
                 what="the run page's selection badge, selection untouched")
        for page in PAGES:
            path = page + server.first_run if page == "/run/" else page
            driver.get(server.url + path)
            wait_for(lambda: driver.find_elements("css selector", "main .page-title, main .welcome"), 30,
                     what=f"{path} rendered")
            _settle(driver)
            for w, h in SIZES[::-1]:  # 1920x1080, then 1280x720 (where the keyboard pass follows)
                driver.set_window_size(w, h)
                time.sleep(0.4)  # plotly's responsive resize and the CSS reflow
                _settle(driver)
                problems[f"{path} {w}x{h}"] = sorted(set(driver.execute_script(CHECK_JS)))
            # Tab through the page's controls (inside the runs grid Tab walks cell by cell: reaching it is enough)
            n = driver.execute_script(FOCUS_RECORD_JS)
            chain = ActionChains(driver)
            for _ in range(min(2 * n + 15, MAX_TABS)):
                chain.send_keys(Keys.TAB)
            chain.perform()
            problems[f"{path} keyboard"] = driver.execute_script(FOCUS_CHECK_JS)
            problems[f"{path} console"] = severe_console_errors(driver)
            assert driver.current_url == server.url + path, "left the page by itself"  # /welcome stays
            assert "Traceback" not in driver.page_source, path
    finally:
        driver.quit()
    bad = {k: v[:8] for k, v in problems.items() if v}
    assert not bad, bad


def test_lr_batch_loss_colours_follow_log_loss():
    """A loss at the geometric middle of the cells' range gets Viridis' middle colour, the lowest loss
    yellow (Viridis' top), and no figure mirrors the scale again with reversescale."""
    from types import SimpleNamespace

    from plotly.colors import sample_colorscale

    from dashboard.pages.lr_batch import colour_scale

    lo, hi = 0.03, 0.76
    scale, zlog = colour_scale(SimpleNamespace(lower_is_better=True), np.array([lo, 0.1, hi]))
    assert zlog and scale[0][0] == 0.0 and scale[-1][0] == 1.0
    pos = {round(p, 9): c for p, c in scale}
    mid = (np.sqrt(lo * hi) - lo) / (hi - lo)
    assert pos[round(mid, 9)] == sample_colorscale("Viridis", [0.5])[0]
    assert scale[0][1] == sample_colorscale("Viridis", [1.0])[0]  # best (lowest) loss: yellow
    acc, zlog = colour_scale(SimpleNamespace(lower_is_better=False), np.array([0.5, 0.9]))
    assert not zlog and acc[-1][1].lower() == "#fde725"  # best (highest) accuracy: yellow
