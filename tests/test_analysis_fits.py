"""The tradeoff (B_crit) and LR-scaling fits against ground truth, published numbers and degenerate inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dashboard.analysis import best_per_batch, fit_tradeoff, lr_scaling, steps_to_target
from dashboard.analysis.simulate import frontier_steps, sweep

REFERENCE = Path("/work/shared/reference-data/zhang2024_cbs_steps_to_target.csv")


def _batches(b_crit: float) -> np.ndarray:
    """A power-of-two sweep from B_crit/64 to 64*B_crit (batch sizes >= 1), as a real sweep would be."""
    b = 2.0 ** np.arange(0, 21)
    return b[(b >= b_crit / 64) & (b <= b_crit * 64)]


def _frame(b: np.ndarray, s: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({"batch_size": b, "steps": s})


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    log_b_crit=st.floats(1.0, 4.0),
    log_s_min=st.floats(1.0, 5.0),
    noise=st.floats(0.0, 0.02),
    seed=st.integers(0, 2**32 - 1),
)
@example(log_b_crit=1.0, log_s_min=2.0, noise=0.02, seed=1)
@example(log_b_crit=2.0, log_s_min=3.0, noise=0.02, seed=2)
@example(log_b_crit=3.0, log_s_min=3.0, noise=0.02, seed=3)
@example(log_b_crit=4.0, log_s_min=4.0, noise=0.02, seed=4)
def test_recovers_b_crit_within_10_percent(log_b_crit: float, log_s_min: float, noise: float, seed: int) -> None:
    b_crit, s_min = 10.0**log_b_crit, 10.0**log_s_min
    b = _batches(b_crit)
    s = frontier_steps(b, s_min, b_crit, noise, np.random.default_rng(seed))
    fit = fit_tradeoff(_frame(b, s), n_boot=200, seed=seed)
    assert fit.ok, fit.reason
    assert abs(fit.b_crit / b_crit - 1) < 0.10
    assert abs(fit.s_min / s_min - 1) < 0.10
    assert fit.e_min == pytest.approx(fit.s_min * fit.b_crit)
    assert fit.b_crit_ci[0] <= fit.b_crit * (1 + 1e-6) and fit.b_crit_ci[1] >= fit.b_crit * (1 - 1e-6)
    assert fit.s_min > 0 and fit.e_min > 0


def test_interval_covers_truth_in_most_seeds() -> None:
    """90 % bootstrap intervals at a realistic 5 % noise: they should cover the truth most of the time."""
    covered = {}
    for b_crit in (10.0, 100.0, 1000.0, 10000.0):
        hits = 0
        for seed in range(40):
            b = _batches(b_crit)
            s = frontier_steps(b, 500.0, b_crit, 0.05, np.random.default_rng(1000 + seed))
            fit = fit_tradeoff(_frame(b, s), n_boot=300, seed=seed)
            hits += fit.b_crit_ci[0] <= b_crit <= fit.b_crit_ci[1]
        covered[b_crit] = hits / 40
    assert np.mean(list(covered.values())) >= 0.75, covered
    assert min(covered.values()) >= 0.6, covered


def test_exact_data_is_fitted_exactly() -> None:
    b = np.array([16, 32, 64, 128, 256, 512, 1024, 2048], dtype=float)
    fit = fit_tradeoff(_frame(b, 300.0 * (1 + 200.0 / b)))
    assert fit.b_crit == pytest.approx(200.0, rel=1e-6)
    assert fit.s_min == pytest.approx(300.0, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert np.allclose(fit.residuals, 0, atol=1e-8)
    assert fit.predict([200.0])[0] == pytest.approx(600.0, rel=1e-6)
    front = fit.frontier(50)
    assert front.height == 50 and (front["examples"] == front["batch_size"] * front["steps"]).all()
    assert fit.points().columns == ["batch_size", "steps", "fitted", "residual_log"]


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference data not available")
def test_reproduces_published_fits_on_zhang_2024() -> None:
    """The authors' own log-space fits of the Zhang et al. (2024) table give these B_crit."""
    table = pl.read_csv(REFERENCE)
    expected = {"85M": 2191, "151M": 3240, "302M": 5433, "604M": 7907, "1.2B": 11131}
    for model, b_crit in expected.items():
        d = table.filter(pl.col("model") == model).select(batch_size="batch_size_seqs", steps="steps_to_target")
        fit = fit_tradeoff(d, n_boot=200)
        assert fit.b_crit == pytest.approx(b_crit, rel=0.005), model
        assert fit.b_crit_ci[0] < b_crit < fit.b_crit_ci[1]
        assert fit.r2 > 0.99


# --- degenerate inputs: a reason, never a line -------------------------------------------------------

@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (_frame(np.array([], dtype=float), np.array([], dtype=float)), "no batch size"),
        (_frame(np.array([64.0]), np.array([100.0])), "only 1 batch size"),
        (_frame(np.array([64.0, 64.0, 64.0]), np.array([100.0, 90.0, 80.0])), "only 1 batch size"),
        (_frame(np.array([8.0, 16.0]), np.array([100.0, 60.0])), "only 2 batch size"),
        (_frame(np.array([8.0, 16.0, 32.0]), np.array([np.nan, 60.0, np.inf])), "only 1 batch size"),
        (_frame(np.array([8.0, 16.0, 32.0, 64.0]), np.array([100.0, 100.0, 100.0, 100.0])), "do not fall"),
        (_frame(np.array([8.0, 16.0, 32.0, 64.0]), 800.0 / np.array([8.0, 16.0, 32.0, 64.0])), "perfect scaling"),
        (_frame(np.array([8.0, 16.0, 32.0]), np.array([0.0, -1.0, 50.0])), "only 1 batch size"),
    ],
)
def test_tradeoff_degenerate_inputs_give_reasons(frame: pl.DataFrame, needle: str) -> None:
    fit = fit_tradeoff(frame)
    assert not fit.ok
    assert needle in fit.reason
    assert np.isnan(fit.b_crit) and np.isnan(fit.s_min)
    assert np.isnan(fit.predict([32.0])).all()
    assert fit.frontier().height == 0


def test_tradeoff_ignores_unreached_rows_and_nulls() -> None:
    b = np.array([8.0, 16.0, 32.0, 64.0, 128.0, 256.0])
    s = 100 * (1 + 50 / b)
    f = pl.DataFrame({"batch_size": np.r_[b, 512.0], "steps": np.r_[s, 1.0], "reached": [True] * 6 + [False]})
    f = pl.concat([f, pl.DataFrame({"batch_size": [None], "steps": [5.0], "reached": [True]},
                                   schema=f.schema)])
    fit = fit_tradeoff(f)
    assert fit.ok and fit.n_points == 6 and fit.b_crit == pytest.approx(50, rel=1e-6)


def test_tradeoff_rejects_several_targets() -> None:
    f = pl.DataFrame({"target": [0.5, 0.3, 0.3], "batch_size": [8, 16, 32], "steps": [3.0, 2.0, 1.0]})
    with pytest.raises(ValueError, match="several targets"):
        fit_tradeoff(f)


def test_b_crit_beyond_the_data_is_flagged() -> None:
    b = np.array([8.0, 16.0, 32.0, 64.0, 128.0])
    fit = fit_tradeoff(_frame(b, 10 * (1 + 400 / b) * np.exp(0.01 * np.sin(b))))
    assert fit.ok
    assert any("outside the batch sizes" in w for w in fit.warnings)


# --- LR scaling --------------------------------------------------------------------------------------

def test_lr_scaling_recovers_b_noise_from_a_sweep() -> None:
    runs, steps, _ = sweep(b_crit=128.0, lr_mults=(0.5, 1.0, 2.0), noise=0.02, seed=3)
    best = best_per_batch(steps_to_target(steps, 0.3, smoothing_examples=1024, runs=runs))
    fit = lr_scaling(best)
    assert fit.ok, fit.reason
    assert fit.b_noise == pytest.approx(128.0, rel=0.10)
    assert fit.eps_max == pytest.approx(0.8, rel=0.10)
    assert fit.predict([128.0])[0] == pytest.approx(fit.eps_max / 2)
    assert fit.curve(20).height == 20


@settings(max_examples=20, deadline=None, derandomize=True)
@given(log_b=st.floats(1.0, 3.5), seed=st.integers(0, 2**16))
def test_lr_scaling_property(log_b: float, seed: int) -> None:
    b_noise = 10.0**log_b
    b = _batches(b_noise)
    rng = np.random.default_rng(seed)
    lr = 0.5 / (1 + b_noise / b) * np.exp(0.02 * rng.standard_normal(len(b)))
    fit = lr_scaling(pl.DataFrame({"batch_size": b, "lr": lr}), n_boot=100)
    assert fit.ok and abs(fit.b_noise / b_noise - 1) < 0.15


@pytest.mark.parametrize(
    ("lrs", "needle"),
    [([0.1, 0.1, 0.1, 0.1], "does not change"), ([0.1, 0.2, 0.4, 0.8], "linear"), ([0.1, 0.2], "only 2")],
)
def test_lr_scaling_degenerate(lrs: list[float], needle: str) -> None:
    b = [8.0, 16.0, 32.0, 64.0][: len(lrs)]
    fit = lr_scaling(pl.DataFrame({"batch_size": b, "lr": lrs}))
    assert not fit.ok and needle in fit.reason and np.isnan(fit.b_noise)
    assert fit.curve().height == 0


def test_lr_scaling_edges_and_adam_are_flagged() -> None:
    b = np.array([8.0, 16.0, 32.0, 64.0, 128.0])
    lr = 1.0 / (1 + 32 / b)
    f = pl.DataFrame({"batch_size": b, "lr": lr, "lr_at_edge": [True, False, False, False, False],
                      "optimizer": ["adam"] * 5})
    fit = lr_scaling(f)
    assert any("edge" in w for w in fit.warnings) and any("SGD" in w for w in fit.warnings)
    dropped = lr_scaling(f, drop_edges=True)
    assert dropped.n_points == 4 and dropped.b_noise == pytest.approx(32, rel=1e-4)
