"""Curvature at evaluation steps: sharpness (Keskar et al. 2016) and B_noise (McCandlish et al. 2018).

- Sharpness: the top eigenvalue of the Hessian H of the loss on a fixed batch, by power iteration with
  Hessian-vector products (double backward through one retained graph), warm-started from the previous
  evaluation's eigenvector so later evaluations converge in a few products.
- B_noise = tr(H Sigma) / (G^T H G): the noise scale that weighs each gradient direction by its
  curvature; McCandlish et al. show B_crit tracks it and B_noise <= B_simple is typical (B_simple is the
  same ratio with H = I). Estimated like B_simple, from K micro-batch gradients g_k of size b and their
  mean g (size Kb): E[g_k^T H g_k] = G^T H G + tr(H Sigma)/b, so the same unbiased two-size estimator
  (trainer.gns.unbiased_estimates) applies in the H-metric. One HVP per micro-batch; H g is their mean.

H comes from one half of a fixed sample and the gradients from the other half: the same examples in both
would correlate g_k with H and bias g_k^T H g_k. All of it is pure torch, on the model's device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainer.gns import unbiased_estimates

HVP = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
POWER_ITERS = 30  # cap on HVPs per sharpness estimate
POWER_TOL = 1e-3  # relative change of the Rayleigh quotient that stops the iteration
N_MICRO = 8  # micro-batches behind B_noise


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _math_attention():
    """Fused attention kernels have no double backward: use the composite (math) one for HVPs."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def flat_grad(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean-loss gradient on (x, y) as one flat vector (p.grad untouched)."""
    params = _params(model)
    grads = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
    return torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                      for p, g in zip(params, grads, strict=True)])


def make_hvp(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> HVP:
    """v -> H v for the Hessian of the mean loss on (x, y), flat vectors in parameter order.

    The gradient graph is built once and retained, so each product costs one backward pass.
    """
    params = _params(model)
    with _math_attention():
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads, strict=True)]
    live = [(i, g) for i, (_, g) in enumerate(pairs) if g is not None and g.requires_grad]
    sizes = [p.numel() for p in params]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        pieces = list(v.detach().split(sizes))
        out = [torch.zeros_like(piece) for piece in pieces]
        if live:
            with _math_attention():
                hv = torch.autograd.grad([g for _, g in live], params,
                                         grad_outputs=[pieces[i].view_as(g) for i, g in live],
                                         retain_graph=True, allow_unused=True)
            out = [o if h is None else h.reshape(-1) for o, h in zip(out, hv, strict=True)]
        return torch.cat(out)

    return hvp


@dataclass(frozen=True)
class Sharpness:
    """Top Hessian eigenvalue; `vector` is its unit eigenvector (a warm start for the next estimate)."""

    value: float
    iterations: int
    converged: bool
    vector: torch.Tensor


def power_iteration(hvp: HVP, v0: torch.Tensor, iters: int = POWER_ITERS, tol: float = POWER_TOL,
                    shift: float = 0.0) -> tuple[float, torch.Tensor, int, bool]:
    """Dominant eigenvalue of (H - shift I) by power iteration with the Rayleigh quotient."""
    v = v0 / v0.norm()
    lam, prev = math.nan, math.nan
    for i in range(1, iters + 1):
        w = hvp(v) - shift * v
        lam = float(torch.dot(v, w))
        norm = w.norm()
        if not torch.isfinite(norm) or norm == 0:
            return lam + shift, v, i, False
        v = w / norm
        if math.isfinite(prev) and abs(lam - prev) <= tol * max(abs(lam), 1e-12):
            return lam + shift, v, i, True
        prev = lam
    return lam + shift, v, iters, False


def sharpness(hvp: HVP, dim: int, v0: torch.Tensor | None = None, iters: int = POWER_ITERS,
              tol: float = POWER_TOL, generator: torch.Generator | None = None,
              device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Sharpness:
    """The largest (algebraic) Hessian eigenvalue.

    Power iteration finds the eigenvalue of largest magnitude; when that is negative (a saddle, early in
    training) a second pass on H - lambda I finds the largest one, which is what "sharpness" means.
    """
    if v0 is None or v0.numel() != dim:
        v0 = torch.randn(dim, generator=generator, device=device, dtype=dtype)
    lam, v, n, ok = power_iteration(hvp, v0, iters, tol)
    if lam < 0:
        lam2, v2, n2, ok = power_iteration(hvp, torch.randn_like(v), iters, tol, shift=lam)
        lam, v, n = lam2, v2, n + n2
    return Sharpness(lam, n, ok, v.detach())


@dataclass(frozen=True)
class NoiseIngredients:
    """One measurement's raw estimates (unbiased, unclamped) with identity and with H as the metric."""

    g_sq: float  # |G|^2
    tr_sigma: float  # tr(Sigma)
    ghg: float  # G^T H G
    tr_h_sigma: float  # tr(H Sigma)
    b_small: float
    b_big: float

    @property
    def b_simple(self) -> float:
        return self.tr_sigma / self.g_sq if self.g_sq > 0 else math.nan

    @property
    def b_noise(self) -> float:
        return self.tr_h_sigma / self.ghg if self.ghg > 0 else math.nan


def noise_ingredients(grads: list[torch.Tensor], sizes: list[int], hvp: HVP) -> NoiseIngredients:
    """B_simple's and B_noise's ingredients from K >= 2 micro-batch mean gradients of the given sizes."""
    if len(grads) < 2:
        raise ValueError("B_noise needs at least two micro-batch gradients")
    total = float(sum(sizes))
    hg = [hvp(g) for g in grads]
    small = sum(float(torch.dot(g, g)) for g in grads) / len(grads)
    small_h = sum(float(torch.dot(g, h)) for g, h in zip(grads, hg, strict=True)) / len(grads)
    big = sum(g * (b / total) for g, b in zip(grads, sizes, strict=True))
    big_h = sum(h * (b / total) for h, b in zip(hg, sizes, strict=True))
    b_small = len(sizes) / sum(1.0 / b for b in sizes)  # harmonic mean, as trainer/step.py
    g_sq, tr_sigma = unbiased_estimates(small, b_small, float(torch.dot(big, big)), total)
    ghg, tr_h_sigma = unbiased_estimates(small_h, b_small, float(torch.dot(big, big_h)), total)
    return NoiseIngredients(g_sq, tr_sigma, ghg, tr_h_sigma, b_small, total)


@dataclass(frozen=True)
class Curvature:
    sharpness: Sharpness
    noise: NoiseIngredients


def measure(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, n_micro: int = N_MICRO,
            v0: torch.Tensor | None = None, iters: int = POWER_ITERS, tol: float = POWER_TOL) -> Curvature:
    """Sharpness and B_noise on a fixed sample: H on its first half, K micro-batch gradients on the rest."""
    half = x.shape[0] // 2
    if x.shape[0] - half < n_micro or half < 1:
        raise ValueError(f"{x.shape[0]} examples cannot give a Hessian half and {n_micro} micro-batches")
    hvp = make_hvp(model, loss_fn, x[:half], y[:half])
    params = _params(model)
    dim = sum(p.numel() for p in params)
    gen = torch.Generator(device=x.device).manual_seed(0)
    sharp = sharpness(hvp, dim, v0, iters, tol, generator=gen, device=x.device, dtype=params[0].dtype)
    xs, ys = x[half:].tensor_split(n_micro), y[half:].tensor_split(n_micro)
    grads = [flat_grad(model, loss_fn, xk, yk).detach() for xk, yk in zip(xs, ys, strict=True)]
    return Curvature(sharp, noise_ingredients(grads, [len(xk) for xk in xs], hvp))


class CurvatureProbe:
    """The trainer's --curvature: measures at each evaluation on the task's fixed sample and logs scalars
    `sharpness`, `b_noise` and the raw ingredients (so B_noise can be re-averaged over evaluations)."""

    def __init__(self, fixed_sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]], examples: int):
        self.x, self.y = fixed_sample(examples)
        self.v: torch.Tensor | None = None

    def log(self, run, model: nn.Module, loss_fn: LossFn, step: int) -> Curvature:
        c = measure(model, loss_fn, self.x, self.y, v0=self.v)
        self.v = c.sharpness.vector
        n = c.noise
        values = dict(sharpness=c.sharpness.value, sharpness_iters=c.sharpness.iterations, b_noise_ghg=n.ghg,
                      b_noise_tr_h_sigma=n.tr_h_sigma, b_noise_g_sq=n.g_sq, b_noise_tr_sigma=n.tr_sigma)
        if math.isfinite(n.b_noise):
            values["b_noise"] = n.b_noise
        run.log(step, **{k: float(v) for k, v in values.items() if math.isfinite(v)})
        return c
