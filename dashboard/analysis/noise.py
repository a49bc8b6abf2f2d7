"""The gradient noise scale B_simple = tr(Sigma)/|G|^2 from the raw per-step ingredients.

McCandlish et al. (2018), App. A: with |g_small|^2 measured over b_small examples and |g_big|^2 over
b_big > b_small, the unbiased estimates are

    |G|^2  = (b_big |g_big|^2 - b_small |g_small|^2) / (b_big - b_small)
    tr(S)  = (|g_small|^2 - |g_big|^2) / (1/b_small - 1/b_big)

Single-step estimates are extremely noisy (|G|^2 often comes out negative), so B_simple is always a
ratio of *averages* of the two, never an average of per-step ratios, and the raw (unclamped) values are
returned: clamp only when drawing.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from dashboard.analysis.frames import as_frame, floats, require

INGREDIENTS = ("g_small_sq", "b_small", "g_big_sq", "b_big")


def noise_estimates(steps: Any) -> pl.DataFrame:
    """Measured steps only, with the raw unbiased per-step estimates `g2` (|G|^2) and `trace_sigma`.

    A step counts as measured when all four ingredients are finite and b_big > b_small (the same rule
    as the SQL macros), so skipped, non-finite or degenerate measurements never enter an average.
    """
    steps = as_frame(steps, "steps")
    require(steps, ["run_id", "step", *INGREDIENTS], "steps")
    cols = [c for c in ("run_id", "step", "examples", "loss", "batch_size", *INGREDIENTS) if c in steps.columns]
    f = floats(steps.select(cols), INGREDIENTS)
    ok = pl.all_horizontal([pl.col(c).is_finite() for c in INGREDIENTS]) & (pl.col("b_big") > pl.col("b_small"))
    gs, bs, gb, bb = (pl.col(c) for c in INGREDIENTS)
    return (
        f.filter(ok.fill_null(False))
        .with_columns(
            g2=(bb * gb - bs * gs) / (bb - bs),
            trace_sigma=(gs - gb) / (1.0 / bs - 1.0 / bb),
        )
        .sort("run_id", "step")
    )


def _ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    return pl.when(den != 0).then(num / den).otherwise(None)


def noise_scale(steps: Any, *, ema_examples: float | None = None, window: int | None = None) -> pl.DataFrame:
    """B_simple over training, per run, as a ratio of smoothed |G|^2 and tr(Sigma) estimates.

    Two smoothers, both applied to numerator and denominator separately:

    - ``window=k``: sums over the trailing k measured steps (identical to the SQL macro
      ``noise_scale(k)`` in schema/sql/10_core.sql).
    - ``ema_examples=tau`` (the default): an exponential moving average that decays per *example*
      (weight exp(-examples/tau)), so a batch-size change does not change the window, debiased at the
      start like Adam's moments (the EMA is divided by its total weight, so early values are not
      pulled towards zero). Default tau: 1/20 of the median run's examples.

    Returns one row per measured step: run_id, step, examples, [loss], g2, trace_sigma (raw per step),
    g2_avg, trace_sigma_avg (smoothed) and b_simple = trace_sigma_avg / g2_avg (raw: may be negative or
    huge where |G|^2 is tiny; NULL where it is exactly 0).
    """
    if window is not None and ema_examples is not None:
        raise ValueError("pass window= or ema_examples=, not both")
    est = noise_estimates(steps)
    if est.height == 0:
        return est.with_columns(
            [pl.lit(None, dtype=pl.Float64).alias(c) for c in ("g2_avg", "trace_sigma_avg", "b_simple")]
        )
    if window is not None:
        if window < 1:
            raise ValueError("window must be >= 1 measured step")
        n_avg = pl.int_range(1, pl.len() + 1).over("run_id").clip(upper_bound=window)
        out = est.with_columns(
            g2_avg=pl.col("g2").rolling_sum(window, min_samples=1).over("run_id") / n_avg,
            trace_sigma_avg=pl.col("trace_sigma").rolling_sum(window, min_samples=1).over("run_id") / n_avg,
        )
    else:
        require(est, ["examples"], "steps (EMA per example)")
        est = est.filter(pl.col("examples").is_not_null())
        if ema_examples is None:
            total = est.group_by("run_id").agg(pl.col("examples").max())["examples"].median()
            ema_examples = max(1.0, float(total or 1.0) / 20.0)
        if not ema_examples > 0:
            raise ValueError("ema_examples must be > 0")
        half_life = f"{max(1, round(ema_examples * math.log(2)))}i"
        # a zero observation at examples = 0 turns polars' EMA (which starts at the first value) into the
        # un-normalized sum; the same EMA of ones is the total weight used to debias it
        est = est.with_columns(_ex=pl.col("examples").cast(pl.Float64).round().cast(pl.Int64))  # polars wants ints
        starts = est.group_by("run_id").agg(pl.col("_ex").min())
        starts = starts.filter(pl.col("_ex") > 0).select(
            "run_id", pl.lit(0, dtype=pl.Int64).alias("_ex"), pl.lit(True).alias("_virtual")
        )
        both = pl.concat([est.with_columns(_virtual=pl.lit(False)), starts], how="diagonal_relaxed")
        both = both.sort("run_id", "_ex", "_virtual", descending=[False, False, True])
        ema = lambda e: e.ewm_mean_by("_ex", half_life=half_life).over("run_id")  # noqa: E731
        both = both.with_columns(
            _w=ema(pl.when(pl.col("_virtual")).then(0.0).otherwise(1.0)),
            _g=ema(pl.col("g2").fill_null(0.0)),
            _t=ema(pl.col("trace_sigma").fill_null(0.0)),
        )
        out = both.filter(~pl.col("_virtual")).with_columns(
            g2_avg=pl.col("_g") / pl.col("_w"),
            trace_sigma_avg=pl.col("_t") / pl.col("_w"),
        ).drop("_virtual", "_w", "_g", "_t", "_ex")
        out = out.sort("run_id", "step")
    return out.with_columns(b_simple=_ratio(pl.col("trace_sigma_avg"), pl.col("g2_avg")))


def noise_at(steps: Any, points: pl.DataFrame, *, rel_window: float = 0.25) -> pl.DataFrame:
    """B_simple around given steps: ratio of the sums of the estimates over measured steps in
    [s/(1+w), s*(1+w)] (w = rel_window), per row of `points` (columns run_id and `steps`, float).

    Why a relative window: a run's loss changes on the time scale of its own step count, so a window
    proportional to s covers about the same stretch of loss in a short large-batch run and a long
    small-batch one. Adds columns b_simple, g2, trace_sigma (window means) and n_noise (measured steps).
    The SQL macro `crossings` computes the same numbers.
    """
    if rel_window < 0:
        raise ValueError("rel_window must be >= 0")
    require(points, ["run_id", "steps"], "points")
    est = noise_estimates(steps) if not isinstance(steps, pl.DataFrame) or "g2" not in steps.columns else steps
    base = points.with_row_index("_row")
    nan_cols = [pl.lit(None, dtype=pl.Float64).alias(c) for c in ("b_simple", "g2", "trace_sigma")]
    if est.height == 0:
        return base.drop("_row").with_columns(*nan_cols, n_noise=pl.lit(0, dtype=pl.Int64))
    cum = est.select(
        "run_id",
        pl.col("step").cast(pl.Float64),
        pl.col("g2").cum_sum().over("run_id").alias("_cg"),
        pl.col("trace_sigma").cum_sum().over("run_id").alias("_ct"),
        pl.int_range(1, pl.len() + 1).over("run_id").cast(pl.Int64).alias("_cn"),
    ).sort("step")
    q = base.select(
        "_row",
        "run_id",
        (pl.col("steps") * (1.0 + rel_window)).floor().alias("_hi"),
        ((pl.col("steps") / (1.0 + rel_window)).ceil() - 1.0).alias("_lo"),
    ).filter(pl.col("_hi").is_finite())
    hi = q.sort("_hi").join_asof(cum, left_on="_hi", right_on="step", by="run_id", strategy="backward", check_sortedness=False)
    lo = q.sort("_lo").join_asof(cum, left_on="_lo", right_on="step", by="run_id", strategy="backward", check_sortedness=False)
    sums = hi.select("_row", "_cg", "_ct", "_cn").join(
        lo.select("_row", pl.col("_cg").alias("_lg"), pl.col("_ct").alias("_lt"), pl.col("_cn").alias("_ln")),
        on="_row",
    )
    sums = sums.with_columns(pl.col("_lg", "_lt").fill_null(0.0), pl.col("_ln").fill_null(0))
    sums = sums.select(
        "_row",
        n_noise=(pl.col("_cn").fill_null(0) - pl.col("_ln")),
        _g=pl.col("_cg") - pl.col("_lg"),
        _t=pl.col("_ct") - pl.col("_lt"),
    )
    sums = sums.with_columns(
        g2=pl.when(pl.col("n_noise") > 0).then(pl.col("_g") / pl.col("n_noise")),
        trace_sigma=pl.when(pl.col("n_noise") > 0).then(pl.col("_t") / pl.col("n_noise")),
        b_simple=pl.when(pl.col("n_noise") > 0).then(_ratio(pl.col("_t"), pl.col("_g"))),
    ).drop("_g", "_t")
    drop = [c for c in ("b_simple", "g2", "trace_sigma", "n_noise") if c in base.columns]
    out = base.drop(drop).join(sums, on="_row", how="left").sort("_row").drop("_row")
    return out.with_columns(pl.col("n_noise").fill_null(0))


def pooled_b_simple(frame: pl.DataFrame) -> float:
    """Ratio of pooled sums across rows with columns g2, trace_sigma, n_noise (NaN if nothing measured)."""
    f = frame.filter(pl.col("n_noise") > 0)
    if f.height == 0:
        return float("nan")
    g = float((f["g2"] * f["n_noise"]).sum())
    t = float((f["trace_sigma"] * f["n_noise"]).sum())
    return t / g if g != 0 else float("nan")

