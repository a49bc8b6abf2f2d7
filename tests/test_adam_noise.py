"""Adam-preconditioned noise-scale ingredients against exact per-example gradients (torch.func)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from schema.trainer_scalars import TRAINER_SCALARS
from tests.trainer_helpers import one_torch_thread
from trainer import adam_noise
from trainer.adam_noise import AdamNoise, AdamNoiseLog, adam_weights, split_sizes
from trainer.gns import unbiased_estimates


def model_and_frozen_adam(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """A small MLP and an AdamW whose second moments span four decades (so P matters), at step 10."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        v = 10.0 ** (-4 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 1)
        opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": v}
    w = torch.cat([adam_weights(opt)[id(p)].reshape(-1) for p in model.parameters()])
    return model, opt, w


def data(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(len(x), -1) for n in params], dim=1)


def micro_step(model, an, opt, x, y, n_micro):
    """As trainer/step.py does it: backward of loss_k * b_k / B per micro-batch."""
    for p in model.parameters():
        p.grad = None
    assert an.begin(opt)
    sizes = split_sizes(len(x), n_micro)
    for xk, yk, b in zip(x.tensor_split(n_micro), y.tensor_split(n_micro), sizes, strict=True):
        (F.cross_entropy(model(xk), yk) * (b / len(x))).backward()
    return an.step(sizes)


def test_preconditioner_is_adams():
    model, opt, w = model_and_frozen_adam()
    p = next(model.parameters())
    v_hat = opt.state[p]["exp_avg_sq"] / (1 - 0.99**10)
    assert torch.allclose(adam_weights(opt)[id(p)], 1 / (v_hat.sqrt() + 1e-6) ** 2)
    for q in model.parameters():
        opt.state[q]["step"] = torch.tensor(float(adam_noise.ADAM_WARM_STEPS - 1))
    assert adam_weights(opt) is None and not AdamNoise(model).begin(opt)
    for q in model.parameters():
        opt.state[q]["step"] = torch.tensor(10.0)
    opt.state[p]["exp_avg_sq"][0] = 0.0  # never had a gradient: no preconditioner there
    assert (adam_weights(opt)[id(p)][0] == 0).all() and (adam_weights(opt)[id(p)][1:] > 0).all()
    assert adam_weights(torch.optim.AdamW(nn.Linear(2, 2).parameters())) is None  # no state yet


@pytest.mark.parametrize("batch, n_micro", [(12, 3), (11, 3), (10, 2)])
def test_ingredients_are_exact_per_step(batch, n_micro):
    model, opt, w = model_and_frozen_adam()
    x, y = data(batch)
    an = AdamNoise(model)
    s = micro_step(model, an, opt, x, y, n_micro)
    g = per_example(model, x, y)
    parts = [gk.mean(0) for gk in g.tensor_split(n_micro)]
    assert s.g_small_sq.item() == pytest.approx(float(sum((w * gk.square()).sum() for gk in parts) / n_micro),
                                                rel=1e-9)
    assert s.g_big_sq.item() == pytest.approx(float((w * g.mean(0).square()).sum()), rel=1e-9)
    sizes = split_sizes(batch, n_micro)
    assert s.b_big == batch and s.b_small == pytest.approx(n_micro / sum(1 / b for b in sizes))
    assert sizes == [len(t) for t in x.tensor_split(n_micro)]
    assert an.step(sizes) is None  # inactive until the next begin()


def test_preconditioned_b_simple_is_exact_in_expectation():
    """Micro-batches drawn with replacement from 200 examples: the ratio of the mean unbiased estimates
    equals tr(P Sigma P)/|P G|^2 of the exact per-example gradients within 4 standard errors (delta
    method; the draws make it under 3 %), and the preconditioner changes the answer."""
    model, opt, w = model_and_frozen_adam(seed=2)
    x, y = data(200, seed=5)
    g = per_example(model, x, y)
    G = g.mean(0)
    d = g - G
    exact_adam = float((w * d.square()).sum(1).mean() / (w * G.square()).sum())
    exact_plain = float(d.square().sum(1).mean() / G.square().sum())
    an = AdamNoise(model)
    gen = torch.Generator().manual_seed(9)
    est = []
    with one_torch_thread():
        for _ in range(2000):
            idx = torch.randint(0, 200, (128,), generator=gen)
            s = micro_step(model, an, opt, x[idx], y[idx], 2)
            est.append(unbiased_estimates(s.g_small_sq.item(), s.b_small, s.g_big_sq.item(), s.b_big))
    g_sq, tr = np.array(est).T
    ratio = tr.mean() / g_sq.mean()
    cov = np.cov(np.vstack([tr, g_sq]))
    se = np.sqrt((cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / len(tr)) / g_sq.mean()
    assert se < 0.03 * ratio
    assert abs(ratio - exact_adam) < 4 * se, (ratio, exact_adam, se)
    assert abs(exact_adam / exact_plain - 1) > 0.2  # the preconditioner changes the answer here


def test_log_hands_scalars_over_at_sync():
    model, opt, _ = model_and_frozen_adam()
    x, y = data(16)
    an = AdamNoise(model)
    log = AdamNoiseLog(window_examples=64)
    logged = []

    class Run:
        def log(self, step, **values):
            logged.append((step, values))

    for step in (1, 2, 3):
        log.add(step, 16 * step, micro_step(model, an, opt, x, y, 2))
    log.add(4, 64, None)  # not measured: nothing logged
    assert not logged
    log.flush(Run())
    assert [s for s, _ in logged] == [1, 2, 3]
    assert set(logged[0][1]) >= set(adam_noise.COLUMNS)
    assert set().union(*(v for _, v in logged)) <= set(TRAINER_SCALARS)  # all in the data dictionary
    assert all(v["b_big_adam"] == 16 and v["b_small_adam"] == 8 for _, v in logged)
    an.close()
    assert not an._handles
