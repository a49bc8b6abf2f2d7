"""batchscope's fits: functions from polars frames (shaped like the store's tables) to results.

No Dash and no store access: usable from a notebook as well as from the dashboard. Every per-step
quantity (smoothed loss, steps to target with censoring, B_simple over training and at a target, the
best LR per batch) is defined once, as a SQL macro in schema/sql/20_analysis.sql; these functions run
that same macro over the frames they are given (schema.frames), so they agree with the pages and with
SQL on a store by construction. The fits over a few rows (the hyperbola and its bootstrap, ε_opt, the
generalization statistics, the stability map) are Python.

Typical flow for one sweep:

    hits = steps_to_target(steps, [0.5, 0.3], smoothing_examples=1024, runs=runs)   # SQL: crossings(...)
    best = best_per_batch(hits.filter(pl.col("target") == 0.3))                       # SQL: best_lr_of(...)
    fit = fit_tradeoff(best)            # fit.b_crit, fit.b_crit_ci, fit.reason, fit.warnings
    lr_fit = lr_scaling(best)           # eps_max, b_noise
    vs = tradeoff_vs_target(hits)       # B_crit per target next to the measured B_simple
    ns = noise_scale(steps)             # B_simple over training (centred window, with n_noise)
    gen = generalization(evals, runs)   # gap at matched training loss, vs B and g = eps N / (B (1 - m))
    grid = stability_map(summary)       # LR x batch grid with stalled/diverged/unfinished cells
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
