"""noise_scale against the linear-regression closed form, and the estimator rules of DESIGN.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from dashboard.analysis import noise_at, noise_estimates, noise_scale, steps_to_target
from dashboard.analysis.simulate import linreg_b_simple, linreg_steps

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("delta_sq", [0.25, 1.0, 4.0])
def test_linreg_closed_form_at_fixed_parameters(delta_sq: float) -> None:
    """Exactly sampled ingredients at a fixed |delta|^2: the window ratio lands within 10 % of
    B_simple = d (1 + sigma^2/|delta|^2) + 1, and the per-step estimates are unbiased."""
    steps = linreg_steps(20, 1.0, np.full(3000, delta_sq), b_small=8, n_small=8, seed=int(delta_sq * 4))
    exact = linreg_b_simple(20, 1.0, delta_sq)
    ns = noise_scale(steps, noise_window=1.0)  # the last step: steps 1500..3000
    assert ns["n_noise"][-1] == 1501
    assert ns["b_simple"][-1] == pytest.approx(exact, rel=0.10)
    est = noise_estimates(steps)
    assert est["g2"].mean() == pytest.approx(delta_sq, rel=0.10)
    assert est["trace_sigma"].mean() == pytest.approx(21 * delta_sq + 20, rel=0.10)


def test_linreg_tracks_a_falling_loss() -> None:
    """While |delta|^2 falls 8-fold, the centred window follows the closed form at each step's own |delta|^2
    (within 10 %: the window is centred, so the faster and slower halves of the decay nearly cancel)."""
    d2 = 4.0 * np.exp(-np.arange(6000) / 1500)
    steps = linreg_steps(10, 1.0, d2, b_small=16, n_small=8, seed=5)
    ns = noise_scale(steps)
    for s in (1500, 3000, 4500):
        row = ns.filter(pl.col("step") == s).row(0, named=True)
        assert row["n_noise"] == int(np.floor(s * 1.1)) - int(np.ceil(s / 1.1)) + 1
        assert row["b_simple"] == pytest.approx(linreg_b_simple(10, 1.0, d2[s - 1]), rel=0.10), s
    assert ns.filter(pl.col("step") == 4500)["b_simple"][0] > 3 * ns.filter(pl.col("step") == 1500)["b_simple"][0]


def test_ratio_of_averages_not_average_of_ratios() -> None:
    f = pl.DataFrame({"run_id": ["a"] * 4, "step": [1, 2, 3, 4], "examples": [4, 8, 12, 16],
                      "g_small_sq": [2.0, 1.1, 2.0, 1.1], "b_small": [1.0] * 4, "g_big_sq": [1.0, 0.2, 1.0, 0.2],
                      "b_big": [2.0] * 4})
    est = noise_estimates(f)
    ns = noise_scale(f, noise_window=10.0)
    expected = est["trace_sigma"].sum() / est["g2"].sum()
    assert ns["b_simple"][-1] == pytest.approx(expected)
    assert ns["b_simple"][-1] != pytest.approx((est["trace_sigma"] / est["g2"]).mean())


def test_raw_values_are_kept_unclamped() -> None:
    """Single-step |G|^2 estimates go negative: they stay negative (clamp only when drawing)."""
    f = pl.DataFrame({"run_id": ["a"], "step": [1], "examples": [2], "g_small_sq": [1.0], "b_small": [1.0],
                      "g_big_sq": [0.4], "b_big": [2.0]})
    ns = noise_scale(f, noise_window=0.0)
    assert ns["g2"][0] == pytest.approx(-0.2) and ns["b_simple"][0] < 0


def test_skips_unmeasured_nonfinite_and_degenerate_steps() -> None:
    f = pl.DataFrame({"run_id": ["a"] * 5, "step": [1, 2, 3, 4, 5], "examples": [2, 4, 6, 8, 10],
                      "g_small_sq": [1.0, None, float("nan"), 1.0, 1.0], "b_small": [1.0, 1.0, 1.0, 2.0, 1.0],
                      "g_big_sq": [0.6, 0.6, 0.6, 0.6, float("inf")], "b_big": [2.0, 2.0, 2.0, 2.0, 2.0]})
    assert noise_estimates(f)["step"].to_list() == [1]
    assert noise_scale(f.filter(pl.col("step") > 1)).height == 0


def test_window_is_centred_and_counts_its_measurements() -> None:
    """B_simple at step s sums the measured steps within a factor 1 + w of s, on both sides."""
    steps = linreg_steps(10, 1.0, np.full(400, 1.0), seed=2)
    steps = steps.with_columns(g_small_sq=pl.when(pl.col("step") % 2 == 0).then(pl.col("g_small_sq")))
    ns = noise_scale(steps, noise_window=0.25)
    est = noise_estimates(steps)
    row = ns.filter(pl.col("step") == 200).row(0, named=True)
    w = est.filter((pl.col("step") >= 160) & (pl.col("step") <= 250))
    assert row["n_noise"] == w.height == 46
    assert row["b_simple"] == pytest.approx(w["trace_sigma"].sum() / w["g2"].sum())
    with pytest.raises(ValueError):
        noise_scale(steps, noise_window=-1)


def test_constant_ingredients_give_a_constant_estimate() -> None:
    steps = pl.DataFrame({"run_id": ["a"] * 50, "step": range(1, 51), "examples": [7 * i for i in range(1, 51)],
                          "g_small_sq": [1.5] * 50, "b_small": [4.0] * 50, "g_big_sq": [0.75] * 50,
                          "b_big": [16.0] * 50})
    exact = ((1.5 - 0.75) / (1 / 4 - 1 / 16)) / ((16 * 0.75 - 4 * 1.5) / 12)
    for ns in (noise_scale(steps), noise_scale(steps, noise_window=2.0)):
        assert np.allclose(ns["b_simple"].to_numpy(), exact)


def test_noise_at_uses_a_relative_window_around_each_point() -> None:
    steps = linreg_steps(10, 1.0, np.full(400, 1.0), seed=3)
    pts = pl.DataFrame({"run_id": ["linreg", "linreg", "linreg", "nobody"], "steps": [100.0, 200.5, None, 50.0]})
    out = noise_at(steps, pts, noise_window=0.25)
    est = noise_estimates(steps)
    w = est.filter((pl.col("step") >= 161) & (pl.col("step") <= 250))  # ceil(200.5/1.25) .. floor(200.5*1.25)
    row = out.row(1, named=True)
    assert row["n_noise"] == w.height == 90
    assert row["b_simple"] == pytest.approx(w["trace_sigma"].sum() / w["g2"].sum())
    assert out["n_noise"].to_list()[2:] == [0, 0] and out["b_simple"][2] is None


def test_steps_to_target_reports_b_simple_at_the_crossing() -> None:
    d2 = 4.0 * np.exp(-np.arange(3000) / 800)
    steps = linreg_steps(10, 1.0, d2, b_small=8, n_small=8, seed=9)
    hit = steps_to_target(steps, 0.5 * (0.5 + 1.0), smoothing_examples=50 * 64, noise_window=0.25).row(0, named=True)
    assert hit["reached"] and hit["n_noise"] > 100  # the target is the loss at |delta|^2 = 0.5
    s = hit["steps"]
    mean_d2 = d2[int(s / 1.25):int(s * 1.25)].mean()
    assert hit["b_simple"] == pytest.approx(linreg_b_simple(10, 1.0, mean_d2), rel=0.15)


@pytest.mark.slow
def test_logged_linreg_run_from_the_trainer(tmp_path: Path) -> None:
    """A real `python -m trainer --task linreg` run: the store's raw ingredients, through noise_scale (the
    pages' definition), agree with the closed form at the logged |delta|^2 of the window within 10 %."""
    db = tmp_path / "linreg.duckdb"
    cmd = [sys.executable, "-m", "trainer", "--task", "linreg", "--dim", "20", "--noise", "1.0", "--batch", "64",
           "--accum", "4", "--lr", "0.002", "--steps", "900", "--db", str(db), "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not db.exists():
        pytest.skip(f"trainer not usable here: {proc.stderr[-500:]}")
    con = duckdb.connect(str(db), read_only=True)
    try:
        steps = con.sql("SELECT * FROM steps").pl()
        logged = con.sql("SELECT step, value AS delta_sq FROM scalars WHERE name = 'delta_sq' ORDER BY step").pl()
    finally:
        con.close()
    if logged.height < 4:
        pytest.skip("trainer does not log delta_sq")
    ns = noise_scale(steps, noise_window=0.25)
    ls, ld = logged["step"].to_numpy(), np.log(logged["delta_sq"].to_numpy())
    checked = 0
    for s in (300, 450, 600, 720):
        window = np.arange(int(np.ceil(s / 1.25)), int(np.floor(s * 1.25)) + 1)
        if window[0] < ls[0]:
            continue
        mean_d2 = np.exp(np.interp(window, ls, ld)).mean()  # |delta|^2 falls ~exponentially between logs
        got = ns.filter(pl.col("step") == s)["b_simple"][0]
        assert got == pytest.approx(linreg_b_simple(20, 1.0, mean_d2), rel=0.10), s
        checked += 1
    assert checked >= 3
