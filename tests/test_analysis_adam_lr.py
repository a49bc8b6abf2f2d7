"""The Adam LR-vs-batch fit (Li et al. 2024 surge law) against synthetic truth, beside SGD's law."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dashboard.analysis.adam_lr import adam_lr_scaling, surge_shape

B = np.array([8, 16, 32, 64, 128, 256, 512, 1024], dtype=float)


def surge(b, eps_max, b_noise):
    return eps_max / (0.5 * (np.sqrt(b_noise / b) + np.sqrt(b / b_noise)))


def frame(lr, b=B, **extra) -> pl.DataFrame:
    return pl.DataFrame({"batch_size": b, "lr": lr, **extra})


def test_shape_peaks_at_b_noise():
    assert surge_shape(100.0, 100.0) == pytest.approx(0.0)
    assert surge_shape(400.0, 100.0) == pytest.approx(surge_shape(25.0, 100.0))  # symmetric in log B
    assert surge(B, 1.0, 64).max() == pytest.approx(1.0) and B[np.argmax(surge(B, 1.0, 64))] == 64


@pytest.mark.parametrize("b_noise", [12.0, 60.0, 200.0, 700.0])
def test_recovers_exact_parameters(b_noise):
    fit = adam_lr_scaling(frame(surge(B, 3e-3, b_noise)), n_boot=200)
    assert fit.ok, fit.reason
    assert fit.b_noise == pytest.approx(b_noise, rel=1e-4)
    assert fit.eps_max == pytest.approx(3e-3, rel=1e-4)
    assert fit.rmse_log < 1e-6 and fit.better == "surge"
    assert fit.predict(b_noise) == pytest.approx(3e-3, rel=1e-4)


def test_recovers_parameters_from_noisy_data_with_intervals():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(20):
        lr = surge(B, 1e-3, 100.0) * np.exp(rng.normal(0, 0.08, len(B)))
        fit = adam_lr_scaling(frame(lr), n_boot=300, seed=int(rng.integers(1 << 30)))
        assert fit.ok, fit.reason
        assert fit.b_noise == pytest.approx(100.0, rel=0.35)
        assert fit.eps_max == pytest.approx(1e-3, rel=0.15)
        hits += fit.b_noise_ci[0] <= 100.0 <= fit.b_noise_ci[1]
    assert hits >= 14  # 90 % intervals: about 18 of 20 expected


def test_says_which_law_fits_better():
    surge_data = adam_lr_scaling(frame(surge(B, 1e-3, 64.0)), n_boot=0)
    assert surge_data.better == "surge" and "surge law" in surge_data.comparison
    sgd_data = adam_lr_scaling(frame(0.5 / (1 + 64.0 / B)), n_boot=0)
    assert sgd_data.sgd.ok and sgd_data.sgd.b_noise == pytest.approx(64.0, rel=1e-3)
    assert sgd_data.better == "sgd", sgd_data.comparison
    assert np.sum(sgd_data.sgd.residuals**2) < sgd_data.sse_log


@pytest.mark.parametrize("lr, where", [(1e-3 * np.sqrt(B), "above the largest"),
                                        (1e-3 / np.sqrt(B), "below the smallest")])
def test_no_fit_when_the_peak_is_outside_the_batches(lr, where):
    fit = adam_lr_scaling(frame(lr), n_boot=0)
    assert not fit.ok and where in fit.reason
    assert np.isnan(fit.b_noise) and np.isnan(fit.predict(64.0)) and fit.curve().is_empty()
    assert fit.better is None and "could not be fitted" in fit.comparison


def test_no_fit_with_too_few_batch_sizes_or_unreached_targets():
    fit = adam_lr_scaling(frame([1e-3, 2e-3], b=np.array([8.0, 16.0])))
    assert not fit.ok and "only 2 batch size(s)" in fit.reason
    reached = np.array([True, True, False, False, False, False, False, False])
    fit = adam_lr_scaling(frame(surge(B, 1e-3, 64.0), reached=reached))
    assert not fit.ok and "only 2" in fit.reason
    assert not adam_lr_scaling(frame(np.full(8, np.nan))).ok


def test_edges_of_the_lr_grid_are_flagged_or_dropped():
    lr = surge(B, 1e-3, 64.0)
    at_edge = np.zeros(len(B), dtype=bool)
    at_edge[-1] = True
    kept = adam_lr_scaling(frame(lr, lr_at_edge=at_edge), n_boot=0)
    assert kept.ok and kept.n_points == 8 and any("edge of the LR grid" in w for w in kept.warnings)
    dropped = adam_lr_scaling(frame(lr, lr_at_edge=at_edge), n_boot=0, drop_edges=True)
    assert dropped.n_points == 7 and dropped.b_noise == pytest.approx(64.0, rel=1e-4)


def test_several_rows_per_batch_and_several_targets():
    lr = surge(B, 1e-3, 64.0)
    doubled = frame(np.concatenate([lr * 1.1, lr / 1.1]), b=np.concatenate([B, B]))
    assert adam_lr_scaling(doubled, n_boot=0).b_noise == pytest.approx(64.0, rel=1e-4)  # geometric mean
    with pytest.raises(ValueError, match="several targets"):
        adam_lr_scaling(frame(lr, target=np.r_[np.full(4, 0.5), np.full(4, 0.3)]))
