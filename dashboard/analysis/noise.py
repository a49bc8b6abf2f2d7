"""The gradient noise scale B_simple = tr(Sigma)/|G|^2 from frames: the SQL definitions run over them.

McCandlish et al. (2018), App. A: with |g_small|^2 measured over b_small examples and |g_big|^2 over
b_big > b_small, the unbiased estimates are

    |G|^2  = (b_big |g_big|^2 - b_small |g_small|^2) / (b_big - b_small)
    tr(S)  = (|g_small|^2 - |g_big|^2) / (1/b_small - 1/b_big)

Single-step estimates are extremely noisy, so B_simple is a ratio of *window sums* of the two, never an
average of per-step ratios. The one rule (schema/sql/20_analysis.sql): B_simple at step s sums over the
measured steps within a factor (1 + noise_window) of s, a window centred on s, so it follows a falling
loss instead of lagging it like a long EMA; n_noise says how many measurements stand behind each value.
Raw values are returned (negative where |G|^2 is not resolved): clamp only when drawing.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from dashboard.analysis.frames import as_frame, require
from schema.frames import evaluate

INGREDIENTS = ("g_small_sq", "b_small", "g_big_sq", "b_big")
DEFAULT_WINDOW = 0.1


def _steps(steps: Any) -> pl.DataFrame:
    f = as_frame(steps, "steps")
    require(f, ["run_id", "step", *INGREDIENTS], "steps")
    return f


def _window(noise_window: float) -> float:
    if not noise_window >= 0:
        raise ValueError("noise_window must be >= 0")
    return float(noise_window)


def noise_estimates(steps: Any) -> pl.DataFrame:
    """Measured steps only (view `noise_estimates`), with the raw per-step estimates g2 and trace_sigma."""
    return evaluate("SELECT * FROM noise_estimates ORDER BY run_id, step", steps=_steps(steps))


def noise_scale(steps: Any, *, noise_window: float = DEFAULT_WINDOW) -> pl.DataFrame:
    """B_simple over training (macro `noise_scale`): one row per measured step with g2, trace_sigma (raw),
    g2_avg, trace_sigma_avg (window means), b_simple and n_noise."""
    return evaluate("SELECT * FROM noise_scale(noise_window := $w) ORDER BY run_id, step",
                    {"w": _window(noise_window)}, steps=_steps(steps))


def noise_at(steps: Any, points: pl.DataFrame, *, noise_window: float = DEFAULT_WINDOW) -> pl.DataFrame:
    """B_simple around given steps (macro `noise_at_points`): `points` has run_id and steps (float); adds
    b_simple, g2, trace_sigma (window means) and n_noise to each row."""
    require(points, ["run_id", "steps"], "points")
    pts = points.select(pl.col("run_id").cast(pl.String), pl.col("steps").cast(pl.Float64).alias("at_step"))
    got = evaluate("SELECT * FROM noise_at_points('pts', noise_window := $w)", {"w": _window(noise_window)},
                   steps=_steps(steps), pts=pts)
    drop = [c for c in ("b_simple", "g2", "trace_sigma", "n_noise") if c in points.columns]
    out = points.drop(drop).with_row_index("_row").with_columns(pl.col("steps").cast(pl.Float64).alias("_at"))
    out = out.join(got.rename({"at_step": "_at"}), on=["run_id", "_at"], how="left").sort("_row")
    return out.drop("_row", "_at").with_columns(pl.col("n_noise").fill_null(0))


def pooled_b_simple(frame: pl.DataFrame) -> float:
    """Ratio of pooled sums across rows with columns g2, trace_sigma, n_noise (NaN if nothing measured):
    the same pooling as critical_batch_of's b_simple."""
    f = frame.filter(pl.col("n_noise") > 0)
    if f.height == 0:
        return float("nan")
    g = float((f["g2"] * f["n_noise"]).sum())
    t = float((f["trace_sigma"] * f["n_noise"]).sum())
    return t / g if g != 0 else float("nan")
