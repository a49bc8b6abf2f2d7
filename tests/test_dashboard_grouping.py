"""Grouping runs and their bands (dashboard.grouping) and the drawn-data CSV (dashboard.export), against
values computed here by other means: numpy by hand, scipy's own intervals, brute-force coverage."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
from scipy import stats

from dashboard import export, grouping


def _cfg(**kw) -> dict:
    return {"config": json.dumps({"task": "digits", "optimizer": "sgd", "name": f"b{kw['batch']}-lr{kw['lr']}",
                                  "sweep": f"s-{kw['seed']}", "db": f"/tmp/{kw['seed']}.duckdb", **kw})}


def test_seed_replicas_group_by_everything_but_the_seed():
    runs = {f"r{b}{lr}{s}": grouping.run_config(_cfg(batch=b, lr=lr, seed=s))
            for b in (16, 64) for lr in (0.1, 0.3) for s in (0, 1, 2)}
    groups = dict(grouping.group_runs(runs, [grouping.REPLICAS]))
    assert len(groups) == 4 and all(len(ids) == 3 for ids in groups.values())
    assert groups["batch=16 lr=0.1"] == ["r160.10", "r160.11", "r160.12"]  # label: only keys that tell groups apart
    by_lr = dict(grouping.group_runs(runs, ["lr"]))
    assert sorted(by_lr) == ["lr=0.1", "lr=0.3"] and all(len(v) == 6 for v in by_lr.values())
    assert grouping.group_runs(runs, ["task"]) == [("all runs", list(runs))]


def test_run_columns_stand_in_without_config():
    cfg = grouping.run_config({"batch_size": 32, "lr": 0.1, "seed": 3, "config": None})
    assert cfg == {"batch_size": 32, "lr": 0.1, "seed": 3}


def test_band_interpolates_members_onto_their_overlap():
    rng = np.random.default_rng(0)
    members = []
    for lo, hi, n in ((0, 100, 37), (5, 120, 50), (-3, 90, 23)):
        x = np.sort(rng.uniform(lo, hi, n))
        members.append((x, np.sin(x / 15) + rng.normal(0, 0.1, n)))
    b = grouping.aggregate(members, "mean", "minmax")
    overlap = (max(m[0].min() for m in members), min(m[0].max() for m in members))
    assert (b.lo, b.hi) == overlap and b.n == 3
    # the grid is the members' own x values inside the overlap
    expect_x = np.unique(np.concatenate([m[0][(m[0] >= overlap[0]) & (m[0] <= overlap[1])] for m in members]))
    np.testing.assert_array_equal(b.x, expect_x)
    for i in (0, len(b.x) // 2, len(b.x) - 1):
        vals = [np.interp(b.x[i], x, y) for x, y in members]
        assert b.lower[i] == pytest.approx(min(vals)) and b.upper[i] == pytest.approx(max(vals))
        assert b.center[i] == pytest.approx(np.mean(vals))
    med = grouping.aggregate(members, "median", "none")
    assert med.lower is None and med.center[3] == pytest.approx(np.median([np.interp(b.x[3], x, y) for x, y in members]))


def test_no_overlap_no_group_and_nonfinite_points_are_dropped():
    assert grouping.aggregate([([0, 1], [1, 2]), ([2, 3], [1, 2])]) is None
    b = grouping.aggregate([([0, 1, 2], [1.0, np.nan, 3.0]), ([0, 2], [1.0, 1.0])])
    assert list(b.x) == [0.0, 2.0] and list(b.upper) == [1.0, 3.0]  # the NaN point is no grid value
    one = grouping.aggregate([([0, 1], [1, 2])], "mean", "minmax")
    assert one.lower is None and "one run" in one.note


def test_ci_of_the_mean_is_student_t():
    ys = np.array([[1.0, 2.0], [2.0, 2.5], [4.0, 3.0], [3.0, 2.0]])
    b = grouping.aggregate([([0, 1], y) for y in ys], "mean", "ci95")
    for j in range(2):
        lo, hi = stats.t.interval(0.95, len(ys) - 1, loc=ys[:, j].mean(), scale=stats.sem(ys[:, j]))
        assert (b.lower[j], b.upper[j]) == pytest.approx((lo, hi))


def test_median_interval_covers_the_median_at_least_95_percent():
    rng = np.random.default_rng(1)
    assert grouping.median_ci_rank(5) is None  # 2 * 0.5**5 = 6 % > 5 %: no distribution-free 95 % interval
    for n in (6, 9, 20):
        k = grouping.median_ci_rank(n)
        draws = np.sort(rng.exponential(1.0, (20_000, n)), axis=1)  # true median ln 2
        cover = np.mean((draws[:, k - 1] <= np.log(2)) & (draws[:, n - k] >= np.log(2)))
        assert cover >= 0.945
        assert grouping.median_ci_rank(n) == max(j for j in range(1, n // 2 + 1) if stats.binom.cdf(j - 1, n, 0.5) <= 0.025)


def test_band_traces_fill_between_the_edges():
    b = grouping.aggregate([([0, 1, 2], [1, 2, 3]), ([0, 1, 2], [3, 2, 1])], "mean", "minmax")
    lo, hi, mid = grouping.band_traces(b, "g", "rgb(10, 20, 30)", ["a", "b"], "mean", "minmax", "step", "loss", "g0")
    assert lo["y"] == [1, 2, 1] and hi["y"] == [3, 2, 3] and hi["fill"] == "tonexty" and lo.get("fill") is None
    assert mid["y"] == [2, 2, 2] and mid["meta"]["members"] == ["a", "b"] and hi["fillcolor"] == "rgba(10, 20, 30, 0.18)"


def test_drawn_csv_is_the_visible_points():
    traces = [{"name": "B=8", "meta": {"run_id": "r1"}, "x": [1, 2, 3], "y": [0.5, None, 0.25]},
              {"name": "hidden", "visible": "legendonly", "x": [1], "y": [9]},
              {"name": "grid", "x": ["a", "b"], "y": [1, 2], "z": [[0.1, None], [0.3, 0.4]]}]
    frame = export.drawn_frame(traces[:2], {"text": "step"}, "loss")
    text = export.to_csv(frame)
    assert not text.startswith("\ufeff") and '"' not in text
    back = pl.read_csv(io.StringIO(text))
    assert back.columns == ["series", "run_id", "step", "loss"]
    assert back.rows() == [("B=8", "r1", 1.0, 0.5), ("B=8", "r1", 3.0, 0.25)]
    heat = export.drawn_frame(traces[2:])
    assert heat.select("x", "y", "value").rows() == [("a", 1.0, 0.1), ("a", 2.0, 0.3), ("b", 2.0, 0.4)]


def test_curves_name_the_runs_they_leave_out(tmp_path, monkeypatch):
    """Beyond the cap, the runs not drawn are listed, each linked to its run page; seed replicas of the
    synthetic store (2 seeds per cell) group into bands of 2."""
    from dashboard import queries
    from dashboard.components import run_href
    from dashboard.pages import curves
    from dashboard.synthetic import make_store

    db = make_store(tmp_path / "runs.duckdb", n_runs=80, steps=40, seeds=2)
    table = queries.run_table(db)
    ids = table["run_id"].to_list()
    monkeypatch.setattr(curves, "MAX_RUNS", 5)
    fig, _ = curves.curves_figure(db, ids, "loss", "step", 0.0)
    assert {t["meta"]["run_id"] for t in fig["data"]} == set(ids[:5])
    hidden = curves.left_out(db, ids)
    links = [li.children.href for li in hidden.children[2].children]
    assert links == [run_href(r) for r in ids[5:]] and f"{len(ids) - 5} of {len(ids)}" in hidden.children[0].children
    monkeypatch.setattr(curves, "MAX_RUNS", 200)
    pairs = table.filter(pl.len().over("batch_size", "lr") == 2).sort("batch_size", "lr").head(6)["run_id"].to_list()
    fig, note = curves.curves_figure(db, pairs, "loss", "step", 0.0, group_by=[grouping.REPLICAS])
    groups = [t["meta"]["members"] for t in fig["data"] if t["meta"].get("role") == "mean"]
    assert len(groups) == 3 and sorted(r for g in groups for r in g) == sorted(pairs) and "groups of 2 runs" in note
