"""Ground-truth generators for testing and benchmarking the fits (numpy only, no torch, no store).

- sweep(): an LR x batch sweep whose best-LR steps to target follow S(B) = S_min (1 + B_crit/B)
  exactly, up to multiplicative noise, with diverging LRs above a stability edge.
- linreg_steps(): the raw gradient-noise ingredients |g_small|^2, |g_big|^2 for linear regression
  sampled exactly (real per-example gradients), where B_simple = d (1 + sigma^2/|delta|^2) + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl


def frontier_steps(batch_sizes: Sequence[float], s_min: float, b_crit: float, noise: float,
                   rng: np.random.Generator) -> np.ndarray:
    """S(B) = S_min (1 + B_crit/B) times log-normal noise of relative size `noise`."""
    b = np.asarray(batch_sizes, dtype=float)
    return s_min * (1.0 + b_crit / b) * np.exp(noise * rng.standard_normal(b.shape))


def sweep(
    batch_sizes: Sequence[int] = (8, 16, 32, 64, 128, 256, 512, 1024),
    lr_mults: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    *,
    s_min: float = 200.0,
    b_crit: float = 128.0,
    eps_max: float = 0.8,
    target: float = 0.3,
    noise: float = 0.03,
    loss_noise: float = 0.02,
    seeds: int = 1,
    max_steps: int | None = None,
    seed: int = 0,
    train_size: int | None = 50_000,
    diverge_above: float = 3.0,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(runs, steps, evals) of a synthetic sweep with known B_crit.

    The best LR at batch B is eps_max / (1 + b_crit/B) (so B_noise = b_crit here); an LR `m` times it
    takes S(B) / (m * exp(1 - m)) steps, and m > diverge_above diverges. Loss curves are exponentials
    L(t) = 0.05 + 2.25 exp(-k t) with k set so that the clean curve crosses `target` at that S, times
    (1 + loss_noise * N(0,1)) per step. Evals: train/test every ~2 % of the run, test = train + gap
    with a gap that grows with B (and saturates after ~20k examples).
    """
    rng = np.random.default_rng(seed)
    l_inf, l0 = 0.05, 2.3
    runs, steps, evals = [], [], []
    i = 0
    for s in range(seeds):
        for b in batch_sizes:
            s_b = float(frontier_steps([b], s_min, b_crit, noise, rng)[0])
            lr_opt = eps_max / (1.0 + b_crit / b)
            for m in lr_mults:
                run_id = f"{seed:04x}{i:08x}"
                i += 1
                eff = m * np.exp(1.0 - m)
                s_run = s_b / eff
                n = int(max_steps or np.ceil(3 * s_run + 5))
                t = np.arange(1, n + 1)
                k = np.log((l0 - l_inf) / (target - l_inf)) / s_run
                clean = l_inf + (l0 - l_inf) * np.exp(-k * t)
                loss = clean * (1.0 + loss_noise * rng.standard_normal(n))
                status = "finished"
                if m > diverge_above:
                    cut = max(1, int(n * rng.uniform(0.05, 0.3)))
                    loss[cut:] = np.nan
                    loss[cut - 1] = np.inf
                    status = "diverged"
                runs.append({"run_id": run_id, "name": f"b{b}-m{m:g}-s{s}", "sweep": "sim", "status": status,
                             "task": "sim", "optimizer": "sgd", "lr": lr_opt * m, "momentum": 0.0,
                             "weight_decay": 0.0, "batch_size": int(b), "accum_steps": 1, "train_size": train_size,
                             "seed": s})
                steps.append(pl.DataFrame({"run_id": run_id, "step": t, "examples": t * int(b),
                                           "batch_size": int(b), "lr": lr_opt * m, "loss": loss}))
                ev = np.unique(np.r_[np.arange(max(1, n // 50), n + 1, max(1, n // 50)), n])
                tr = clean[ev - 1]
                gap = 0.01 * (1 + np.log2(b)) * (1 - np.exp(-ev * b / 20_000))  # grows with B and with examples
                ok = np.isfinite(loss[ev - 1]) | (status != "diverged")
                for split, v in (("train", tr), ("test", tr + gap)):
                    evals.append(pl.DataFrame({"run_id": run_id, "step": ev, "split": split, "examples": ev * int(b),
                                               "loss": np.where(ok, v, np.nan), "accuracy": np.exp(-v)}))
    return pl.DataFrame(runs), pl.concat(steps), pl.concat(evals)


def linreg_steps(
    dim: int,
    sigma: float,
    delta_sq: float | Sequence[float],
    *,
    b_small: int = 4,
    n_small: int = 4,
    seed: int = 0,
    run_id: str = "linreg",
) -> pl.DataFrame:
    """Steps of a linear-regression "run" with exactly sampled noise ingredients.

    x ~ N(0, I_d), y = w*.x + eps, eps ~ N(0, sigma^2), loss 1/2 (w.x - y)^2 at w = w* + delta with
    |delta|^2 = delta_sq[t] (one value per step; a scalar means one step). Per step, n_small
    micro-batches of b_small examples: g_small_sq = mean_k |g_k|^2, g_big_sq = |mean_k g_k|^2,
    b_big = n_small * b_small. The closed form is B_simple = d (1 + sigma^2/|delta|^2) + 1.
    """
    rng = np.random.default_rng(seed)
    d2 = np.atleast_1d(np.asarray(delta_sq, dtype=float))
    n = len(d2)
    big = b_small * n_small
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    x = rng.standard_normal((n, big, dim))
    eps = sigma * rng.standard_normal((n, big))
    delta = np.sqrt(d2)[:, None] * direction[None, :]
    resid = np.einsum("tbd,td->tb", x, delta) - eps  # w.x - y = delta.x - eps
    grads = x * resid[:, :, None]  # per-example gradients
    g_k = grads.reshape(n, n_small, b_small, dim).mean(axis=2)
    g_small_sq = (g_k**2).sum(-1).mean(-1)
    g_big_sq = (g_k.mean(axis=1) ** 2).sum(-1)
    step = np.arange(1, n + 1)
    return pl.DataFrame({
        "run_id": run_id, "step": step, "examples": step * big, "batch_size": big,
        "loss": 0.5 * (resid**2).mean(-1), "g_small_sq": g_small_sq, "b_small": float(b_small),
        "g_big_sq": g_big_sq, "b_big": float(big),
    })


def linreg_b_simple(dim: int, sigma: float, delta_sq: float) -> float:
    """Closed form B_simple = tr(Sigma)/|G|^2 = d (1 + sigma^2/|delta|^2) + 1 (DESIGN.md)."""
    return dim * (1.0 + sigma**2 / delta_sq) + 1.0
