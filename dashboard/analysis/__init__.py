"""batchscope's fits: pure functions from polars frames (shaped like the store's tables) to results.

No Dash, no SQL, no store access: usable from a notebook as well as from the dashboard. The heavy
per-step reductions have SQL twins in schema/sql/20_analysis.sql (smoothed_steps, crossings,
best_lr_per_batch, critical_batch) that return frames these functions accept directly.

Typical flow for one sweep:

    hits = steps_to_target(steps, [0.5, 0.3], smoothing=20, runs=runs)   # or SQL: crossings([...], 20)
    best = best_per_batch(hits.filter(pl.col("target") == 0.3))
    fit = fit_tradeoff(best)            # fit.b_crit, fit.b_crit_ci, fit.reason, ...
    lr_fit = lr_scaling(best)           # eps_max, b_noise
    vs = tradeoff_vs_target(hits)       # B_crit per target next to the measured B_simple
    ns = noise_scale(steps)             # B_simple over training (ratio of EMAs)
    gen = generalization(evals, runs)   # gap vs batch size and vs g = eps N / (B (1 - m))
    grid = stability_map(summary)       # LR x batch grid with diverged/unfinished cells
"""

from dashboard.analysis.best import best_per_batch
from dashboard.analysis.crossings import metric_curve, smooth_steps, steps_to_target
from dashboard.analysis.generalization import Generalization, generalization
from dashboard.analysis.lr import LRScalingFit, lr_scaling
from dashboard.analysis.noise import noise_at, noise_estimates, noise_scale, pooled_b_simple
from dashboard.analysis.stability import StabilityMap, stability_map
from dashboard.analysis.tradeoff import TradeoffFit, fit_tradeoff, tradeoff_vs_target

__all__ = [
    "Generalization",
    "LRScalingFit",
    "StabilityMap",
    "TradeoffFit",
    "best_per_batch",
    "fit_tradeoff",
    "generalization",
    "lr_scaling",
    "metric_curve",
    "noise_at",
    "noise_estimates",
    "noise_scale",
    "pooled_b_simple",
    "smooth_steps",
    "stability_map",
    "steps_to_target",
    "tradeoff_vs_target",
]
