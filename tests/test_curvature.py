"""Sharpness and B_noise against exact Hessians and per-example gradients (torch.func) on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from tests.trainer_helpers import one_torch_thread
from trainer import charlm, curvature
from trainer.gns import linreg_b_simple


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():  # tiny models on a shared 2-core machine: threads only contend
        yield


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def exact_hessian(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            k = int(np.prod(shape))
            params[name] = flat[i:i + k].view(shape)
            i += k
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0)


def per_example_grads(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(len(x), -1) for n in params], dim=1)


def test_sharpness_matches_the_exact_top_eigenvalue():
    model = tiny_mlp()
    x, y = data(64)
    h = exact_hessian(model, F.cross_entropy, x, y)
    top = float(torch.linalg.eigvalsh(h).max())
    s = curvature.sharpness(curvature.make_hvp(model, F.cross_entropy, x, y), h.shape[0], iters=500, tol=1e-9,
                            generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert s.converged and s.value == pytest.approx(top, rel=0.01)
    # warm start from the eigenvector: converges at once
    again = curvature.sharpness(curvature.make_hvp(model, F.cross_entropy, x, y), h.shape[0], v0=s.vector)
    assert again.iterations <= 3 and again.value == pytest.approx(top, rel=0.01)


def test_sharpness_is_the_largest_eigenvalue_when_a_negative_one_dominates():
    h = torch.diag(torch.tensor([-5.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    s = curvature.sharpness(lambda v: h @ v, 4, iters=2000, tol=1e-10, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
    assert s.value == pytest.approx(2.0, rel=0.01)


def exact_ingredients(g_per_example: torch.Tensor, h: torch.Tensor, ddof: int) -> dict[str, float]:
    """G^T H G, tr(H Sigma), |G|^2 and tr(Sigma) from per-example gradients."""
    g = g_per_example.mean(0)
    d = g_per_example - g
    sigma = d.T @ d / (len(d) - ddof)
    return {"ghg": float(g @ h @ g), "tr_h_sigma": float(torch.trace(h @ sigma)), "g_sq": float(g @ g),
            "tr_sigma": float(torch.trace(sigma))}


def exact_b_noise(g_per_example: torch.Tensor, h: torch.Tensor, ddof: int) -> tuple[float, float]:
    """tr(H Sigma)/(G^T H G) and tr(Sigma)/|G|^2."""
    e = exact_ingredients(g_per_example, h, ddof)
    return e["tr_h_sigma"] / e["ghg"], e["tr_sigma"] / e["g_sq"]


def test_b_noise_equals_the_exact_ratio_with_per_example_micro_batches():
    """K = N micro-batches of one example: the estimates are the textbook unbiased ones from a sample of N,
    tr(H S) with S the sample covariance and G'HG = g'Hg - tr(H S)/N with g the sample mean (and the
    same with H = I for B_simple), to float precision."""
    model = tiny_mlp(3)
    x, y = data(400, seed=4)
    c = curvature.measure(model, F.cross_entropy, x, y, n_micro=200, iters=5)
    h = exact_hessian(model, F.cross_entropy, x[:200], y[:200])  # the Hessian half
    exact = exact_ingredients(per_example_grads(model, F.cross_entropy, x[200:], y[200:]), h, ddof=1)
    exact["ghg"] -= exact["tr_h_sigma"] / 200
    exact["g_sq"] -= exact["tr_sigma"] / 200
    for name, value in exact.items():
        assert getattr(c.noise, name) == pytest.approx(value, rel=1e-6), name
    assert exact["ghg"] > 0 and exact["g_sq"] > 0
    assert c.noise.b_noise == pytest.approx(exact["tr_h_sigma"] / exact["ghg"], rel=1e-6)
    assert c.noise.b_simple == pytest.approx(exact["tr_sigma"] / exact["g_sq"], rel=1e-6)


def test_b_noise_is_unbiased_over_random_micro_batches():
    """Micro-batches of 16 drawn with replacement: the ratio of mean estimates converges to the exact ratio
    (20,000 draws: about 1 % standard error on each ratio)."""
    model = tiny_mlp(5)
    x, y = data(200, seed=6)
    h = exact_hessian(model, F.cross_entropy, x, y)
    g_all = per_example_grads(model, F.cross_entropy, x, y)
    b_noise, b_simple = exact_b_noise(g_all, h, ddof=0)  # sampling with replacement: population covariance
    gen = torch.Generator().manual_seed(7)
    ghg = trhs = gsq = trs = 0.0
    for _ in range(20000):
        idx = torch.randint(0, len(x), (4, 16), generator=gen)
        grads = [g_all[i].mean(0) for i in idx]
        n = curvature.noise_ingredients(grads, [16] * 4, lambda v: h @ v)
        ghg, trhs, gsq, trs = ghg + n.ghg, trhs + n.tr_h_sigma, gsq + n.g_sq, trs + n.tr_sigma
    assert trhs / ghg == pytest.approx(b_noise, rel=0.04)
    assert trs / gsq == pytest.approx(b_simple, rel=0.04)
    assert b_noise < b_simple  # as McCandlish et al. find


def test_b_noise_on_linreg_is_the_closed_form_b_simple():
    """Linear regression, x ~ N(0, I): H = I, so B_noise = B_simple = d(1 + sigma^2/|delta|^2) + 1."""
    d, sigma = 8, 0.5
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    delta_sq = float(w_star.square().sum())

    def loss_fn(out, yy):
        return 0.5 * (out.squeeze(-1) - yy).square().mean()

    def sample(n):
        xx = torch.randn(n, d, generator=gen, dtype=torch.float64)
        return xx, xx @ w_star + sigma * torch.randn(n, generator=gen, dtype=torch.float64)

    xh, yh = sample(20000)
    hvp = curvature.make_hvp(model, loss_fn, xh, yh)  # the empirical Hessian X'X/n of a large batch
    acc = np.zeros(4)
    for _ in range(400):
        xs, ys = sample(64)
        grads = [curvature.flat_grad(model, loss_fn, a, b).detach() for a, b in zip(xs.split(8), ys.split(8),
                                                                                     strict=True)]
        n_id = curvature.noise_ingredients(grads, [8] * 8, lambda v: v)
        n_h = curvature.noise_ingredients(grads, [8] * 8, hvp)
        acc += [n_id.tr_h_sigma, n_id.ghg, n_h.tr_h_sigma, n_h.ghg]
    closed = linreg_b_simple(d, sigma, delta_sq)
    assert acc[0] / acc[1] == pytest.approx(closed, rel=0.05)  # H = I exactly
    assert acc[2] / acc[3] == pytest.approx(closed, rel=0.08)  # H estimated by HVPs on a batch


def test_probe_logs_scalars_on_a_transformer():
    torch.manual_seed(0)
    model = charlm.CharGPT(context=8, layers=1, width=32, heads=2)
    x = torch.randint(0, 256, (32, 8), dtype=torch.uint8)
    logged = {}

    class Run:
        def log(self, step, **values):
            logged.update(values, step=step)

    probe = curvature.CurvatureProbe(lambda n: (x[:n], torch.roll(x, -1, 1)[:n]), 32)
    c = probe.log(Run(), model, charlm.char_loss, 7)
    assert logged["step"] == 7 and logged["sharpness"] == pytest.approx(c.sharpness.value)
    assert c.sharpness.value > 0
    assert {"b_noise_ghg", "b_noise_tr_h_sigma", "b_noise_g_sq", "b_noise_tr_sigma"} <= set(logged)
    assert probe.v is not None and probe.v.shape[0] == sum(p.numel() for p in model.parameters())
    from schema.trainer_scalars import TRAINER_SCALARS

    assert set(logged) - {"step"} <= set(TRAINER_SCALARS)  # every name is in the data dictionary


def test_trainer_logs_curvature_and_adam_noise(tmp_path):
    """A real AdamW run with --curvature: every evaluation has a sharpness, measured Adam steps have
    the preconditioned ingredients, and the plain ingredients are still on every step."""
    import subprocess
    import sys

    import duckdb

    db = tmp_path / "c.duckdb"
    cmd = [sys.executable, "-m", "trainer", "--task", "digits", "--optimizer", "adamw", "--lr", "3e-3",
           "--steps", "120", "--eval-every", "40", "--curvature", "--db", str(db)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    con = duckdb.connect(str(db), read_only=True)
    try:
        sharp = con.execute("SELECT step, value FROM scalars WHERE name = 'sharpness' ORDER BY step").fetchall()
        adam = con.execute("SELECT count(*), min(step) FROM scalars WHERE name = 'g_big_sq_adam'").fetchone()
        plain = con.execute("SELECT count(*) FROM steps WHERE g_small_sq IS NOT NULL").fetchone()[0]
    finally:
        con.close()
    assert [s for s, _ in sharp] == [40, 80, 120] and all(v > 0 for _, v in sharp)
    assert adam == (12, 10)  # every 10th step (Adam's state is warm from step 5 on)
    assert plain == 120
