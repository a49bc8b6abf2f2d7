"""The gradient-noise-scale numbers are right: estimator algebra, the linreg closed form, torch.func."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

from tests.trainer_helpers import one_torch_thread, train_in_process
from trainer.gns import (
    BSimpleEMA,
    ExampleEMA,
    b_simple_window,
    linreg_b_simple,
    unbiased_estimates,
)
from trainer.step import compute_gradients
from trainer.tasks import TaskOptions, make_task

pos = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@settings(max_examples=200, deadline=None)
@given(g_sq=pos, tr=pos, b_small=st.integers(1, 512), factor=st.integers(2, 64))
def test_unbiased_estimates_invert_the_expected_norms(g_sq, tr, b_small, factor):
    """Feeding E|g_b|^2 = |G|^2 + tr(Sigma)/b for both sizes gives back |G|^2 and tr(Sigma) exactly."""
    b_big = b_small * factor
    est_g, est_tr = unbiased_estimates(g_sq + tr / b_small, b_small, g_sq + tr / b_big, b_big)
    assert est_g == pytest.approx(g_sq, rel=1e-6, abs=1e-9 * tr)
    assert est_tr == pytest.approx(tr, rel=1e-6)


def test_example_ema_window_is_counted_in_examples_not_steps():
    """Two updates of n examples equal one update of 2n with the same value: batch size does not matter."""
    a, b = ExampleEMA(1000), ExampleEMA(1000)
    for _ in range(10):
        a.update(3.0, 64)
    b.update(3.0, 640)
    assert a.value == pytest.approx(3.0) and b.value == pytest.approx(3.0)  # bias-corrected from the start
    a.update(5.0, 100)
    b.update(5.0, 50)
    b.update(5.0, 50)
    assert a.value == pytest.approx(b.value)


def test_b_simple_ema_is_a_ratio_of_averages_and_skips_non_finite():
    ema = BSimpleEMA(window_examples=1e12)  # ~equal weights: the plain ratio of means
    rows = [(2.0, 8, 1.0, 32), (3.0, 8, 0.5, 32), (1.5, 8, 1.2, 32)]
    for r in rows:
        ema.update(*r, examples=32)
    before = ema.value
    assert ema.update(math.nan, 8, 1.0, 32, examples=32) == before
    assert ema.update(math.inf, 8, 1.0, 32, examples=32) == before
    g, tr = unbiased_estimates(*map(np.array, zip(*rows, strict=True)))
    assert before == pytest.approx(tr.mean() / g.mean(), rel=1e-6)
    assert b_simple_window(*map(np.array, zip(*rows, strict=True))) == pytest.approx(before, rel=1e-6)
    # a ratio of averages, not an average of ratios
    assert before != pytest.approx(np.mean(tr / g))


LINREG_SETTINGS = [  # (d, sigma, batch, accum)
    (10, 1.0, 32, 1),
    (20, 0.5, 64, 4),
    (5, 2.0, 16, 2),
    (30, 0.0, 96, 3),
]


@pytest.mark.parametrize(("dim", "sigma", "batch", "accum"), LINREG_SETTINGS)
def test_linreg_b_simple_matches_closed_form(dim, sigma, batch, accum):
    """The logged ingredients (windowed ratio of averages) and the logged EMA agree with d(1+s^2/|delta|^2)+1.

    A tiny LR keeps delta = w - w* (nearly) fixed, so every step measures the same B_simple.
    """
    run, result = train_in_process(task="linreg", dim=dim, noise=sigma, batch=batch, accum=accum, lr=1e-7,
                                   steps=1200, seed=dim, gns_window=400.0 * batch, eval_every=600,
                                   gns_every=1, gns_method="micro-batch" if accum > 1 else "per-example")
    assert result.status == "finished"
    steps = run.steps()
    assert np.all(np.isfinite(steps["g_small_sq"])), "every step is measured (micro-batches, or per-example at K = 1)"
    assert np.all(steps["b_big"] == batch)
    assert np.all(steps["b_small"] == (batch // accum if accum > 1 else 1))
    delta_sq = run.scalar("delta_sq")
    assert delta_sq[0] == pytest.approx(delta_sq[-1], rel=1e-3)
    exact = linreg_b_simple(dim, sigma, delta_sq[-1])
    assert run.scalar("b_simple_exact")[-1] == pytest.approx(exact)
    windowed = b_simple_window(steps["g_small_sq"], steps["b_small"], steps["g_big_sq"], steps["b_big"], window=1000)
    assert windowed == pytest.approx(exact, rel=0.10)
    assert steps["b_simple"][-1] == pytest.approx(exact, rel=0.10)
    # the population loss is logged exactly too: (|delta|^2 + sigma^2) / 2
    pop = [e for e in run.evals if e["split"] == "population"]
    assert pop[-1]["loss"] == pytest.approx(0.5 * (delta_sq[-1] + sigma**2))


def test_micro_batch_estimates_match_exact_per_example_gradients():
    """E over batches of the micro-batch |G|^2 and tr(Sigma) estimates = the exact values from torch.func.

    Exact: per-example gradients of the whole digits training set with vmap(grad); Sigma is their
    population covariance. Batches are drawn with replacement, the i.i.d. setting the estimator assumes.
    """
    task = make_task("digits", TaskOptions(), torch.device("cpu"))
    x, y = task.eval_sets["train"]
    torch.manual_seed(0)
    model = task.build_model()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return task.loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per_example.values()], 1).double()
    mean = flat.mean(0)
    exact_g_sq = float(mean @ mean)
    exact_tr = float(((flat - mean) ** 2).sum(1).mean())

    gen = torch.Generator().manual_seed(1)
    for batch, n_micro in ((64, 2), (64, 4)):
        draws = []
        for _ in range(300):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            model.zero_grad(set_to_none=True)
            s = compute_gradients(model, task.loss_fn, x[idx], y[idx], n_micro)
            assert s.b_small == batch / n_micro and s.b_big == batch
            draws.append(unbiased_estimates(float(s.g_small_sq), s.b_small, float(s.g_big_sq), s.b_big))
        est = np.array(draws)
        mean_est, stderr = est.mean(0), est.std(0) / np.sqrt(len(est))
        for got, se, want in zip(mean_est, stderr, (exact_g_sq, exact_tr), strict=True):
            assert abs(got - want) < 4 * se, (batch, n_micro, got, want, se)
            assert got == pytest.approx(want, rel=0.10)


def test_uneven_micro_batches_still_give_the_full_batch_gradient_and_unbiased_b_small():
    """A batch that does not split evenly: weights b_k/B keep the gradient exact, b_small is the harmonic mean."""
    task = make_task("digits", TaskOptions(), torch.device("cpu"))
    x, y = task.next_batch(33)
    torch.manual_seed(0)
    model = task.build_model()
    task.loss_fn(model(x), y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    s = compute_gradients(model, task.loss_fn, x, y, 2)  # 17 + 16
    for p, g in zip(model.parameters(), full, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert s.b_small == pytest.approx(2 / (1 / 17 + 1 / 16))
    assert float(s.g_big_sq) == pytest.approx(float(sum((g * g).sum() for g in full)), rel=1e-5)
