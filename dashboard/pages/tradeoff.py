"""Tradeoff: steps vs examples to a target loss, the fitted frontier S(B) = S_min + E_min/B, the critical
batch size B_crit = E_min/S_min with its interval, and B_crit against the target next to the measured
B_simple (McCandlish et al. 2018). All numbers come from dashboard.analysis; with "Count: tokens" they are
the same fit with examples counted in tokens (`TradeoffFit.in_tokens`, for a sweep whose runs share one
number of tokens per example). Figures: dashboard/tradeoff_figures.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
from dash import Input, Output, State, callback, dcc, html

from dashboard import analysis, queries, sweeps
from dashboard.components import (
    graph_panel,
    page_layout,
    page_scope,
    radio_control,
    register_page,
    scope_callback,
    scope_dropdown,
)
from dashboard.theme import ACCENT, empty_figure, fmt, note, plural, stat
from dashboard.tradeoff_figures import (
    EXAMPLES,
    Units,
    frontier_figure,
    steps_vs_batch_figure,
    vs_target_figure,
)

register_page(__name__, path="/tradeoff", name="Tradeoff", title="batchscope · tradeoff", order=3)


def _ci(lo: float, hi: float) -> str:
    return f"90% CI {fmt(lo)} – {fmt(hi)}"


def extrapolated(fit) -> bool:
    """B_crit outside the batch sizes measured: a number to sweep towards, not a batch size to run."""
    return fit.ok and not (fit.batch_sizes.min() <= fit.b_crit <= fit.batch_sizes.max())


def next_run_sentence(fit, target: float, metric_label: str, units: Units = EXAMPLES) -> str:
    """What B_crit means for the next run, in one sentence (no batch size when B_crit is extrapolated).
    `fit` is in `units`; the batch size to run is named in examples (sequences) either way."""
    c, unit = units
    b = fit.b_crit
    if extrapolated(fit):
        side = "above the largest" if b > fit.batch_sizes.max() else "below the smallest"
        return (f"B_crit ≈ {fmt(b)}{_in(units)} for {metric_label} {fmt(target)} lies {side} batch size measured "
                f"({fmt(fit.batch_sizes.min())}–{fmt(fit.batch_sizes.max())}), so it is extrapolated: before choosing "
                "a batch size from it, sweep batch sizes on both sides of it.")
    e = b / c  # in examples: the powers of two a run is configured with
    lo = 2 ** math.floor(math.log2(e)) if e >= 1 else e
    hi = 2 ** math.ceil(math.log2(e)) if e >= 1 else e
    pick = f"B = {lo:g}–{hi:g}" if lo != hi else f"B = {lo:g}"
    if unit != "examples":
        pick += f" sequences ({fmt(lo * c)}–{fmt(hi * c)} tokens)" if lo != hi else f" sequences ({fmt(lo * c)} tokens)"
    return (f"To reach {metric_label} {fmt(target)}, batches up to about B_crit ≈ {fmt(b)}{_in(units)} cut the number "
            f"of steps almost in proportion (near-perfect scaling), while batches well beyond it mostly spend more {unit} "
            f"for few saved steps: for the next run, {pick} costs about 2 × S_min ≈ {fmt(2 * fit.s_min)} steps and "
            f"2 × E_min ≈ {fmt(2 * fit.e_min)} {unit} — go larger only if wall-clock time matters more than compute.")


def _in(units: Units) -> str:
    return "" if units == EXAMPLES else f" {units[1]}"


def _unit_label(units: Units) -> str:
    return "" if units == EXAMPLES else f" ({units[1]})"


def common_tokens(tpe: dict[str, float], run_ids: list[str]) -> tuple[float | None, str | None]:
    """The one number of tokens per example that every run shares (None, and why, if there is none):
    a sweep over sequence lengths has no single token count per example to scale its fit by."""
    without = [r for r in run_ids if r not in tpe]
    if without:
        return None, (f"{plural(len(without), 'run')} of {len(run_ids)} count no tokens (runs.tokens_per_step is "
                      "NULL): shown in examples")
    values = {round(tpe[r], 9) for r in run_ids}
    if len(values) > 1:
        return None, (f"the runs count {len(values)} different numbers of tokens per example (context lengths): "
                      "a sweep over sequence lengths has no single token count; shown in examples")
    return float(values.pop()), None


def smoothing_text(width: float, metric: str) -> str:
    """How the loss behind the crossings was smoothed, in words."""
    if metric != "train_loss":
        return "Evaluation losses (fixed data) are used as logged, not smoothed."
    if width <= 0:
        return "The training loss is used raw, step by step (no smoothing)."
    return (f"The training loss is averaged over buckets of {fmt(width)} examples, whatever the batch size, so every "
            "batch size's crossing is read through the same amount of gradient noise (buckets of a fixed number of "
            "steps would smooth small batches far less than large ones).")


@queries.in_session
def tradeoff_view(db: Path, run_ids: list[str], target: float | None = None, metric: str = "train_loss",
                  smooth: float = 1, count: str = "examples") -> dict:
    """Everything the page shows for a set of runs, a target (None: the default target) and a loss smoothing
    of `smooth` times the largest batch size, in examples; `count="tokens"` shows the same fit in tokens
    when every run shares one number of tokens per example (else in examples, with `units_note` saying why)."""
    out: dict = {"target": None, "range": None, "fit": None, "frontier": empty_figure("No runs."),
                 "vs_batch": empty_figure(""), "vs_target": empty_figure(""), "notes": [], "missed": None,
                 "width": 0.0, "trend": None, "units": EXAMPLES, "units_note": None}
    if not run_ids:
        return out
    width = sweeps.default_smoothing(db, run_ids, metric, smooth)
    out["width"] = width
    tr = sweeps.target_range(db, run_ids, metric, width)
    if tr is None:
        out["frontier"] = empty_figure(f"No finite {sweeps.TARGET_METRICS[metric]} logged in these runs.")
        return out
    out["range"] = tr
    t = sweeps.snap(tr.default if target is None else target)
    out["target"] = t
    label = sweeps.TARGET_METRICS[metric]
    hits = sweeps.hits_for(db, run_ids, (t,), metric, width)
    best = analysis.best_per_batch(hits)
    fit = analysis.fit_tradeoff(best)
    units = EXAMPLES
    if count == "tokens":
        c, out["units_note"] = common_tokens(queries.tokens_per_example(db, run_ids), run_ids)
        if c is not None:
            units, fit = (c, "tokens"), fit.in_tokens(c)
    out["units"] = units
    out["fit"] = fit
    out["hits"] = hits
    out["best"] = best
    out["b_simple"] = units[0] * analysis.pooled_b_simple(best.filter(pl.col("reached") & ~pl.col("censored")))
    missed = hits.filter(~pl.col("reached"))
    if missed.height:
        reasons = missed.with_columns(pl.col("reason").str.replace(r" \(.*", "").str.replace(r":.*", "")).group_by(
            "reason").len()
        out["missed"] = f"{missed.height} of {plural(hits.height, 'run')} have no measured crossing of {fmt(t)}: " + "; ".join(
            f"{r['len']} {r['reason']}" for r in reasons.sort(["len", "reason"], descending=[True, False]).to_dicts())
    out["frontier"] = frontier_figure(hits, best, fit, t, label, units)
    out["vs_batch"] = steps_vs_batch_figure(hits, best, fit, t, units)
    grid = tuple(sweeps.snap(x) for x in sweeps.target_grid(tr))
    vs = sweeps.vs_target(db, run_ids, grid, metric, width)
    ok = vs.filter(pl.col("reason").is_null())
    rho, p = sweeps.trend(ok["target"].to_list(), ok["b_crit"].to_list())
    grows = bool(np.isfinite(rho) and rho < 0 and p < 0.1)
    out["trend"] = (rho, p, grows)
    out["vs_target"] = vs_target_figure(vs, label, tr.higher_is_better, grows, units)
    out["vs_table"] = vs
    return out


def layout(**_kwargs):
    target = html.Div(
        [html.Label("Target", className="control-label"),
         html.Div([dcc.Slider(id="tradeoff-target", min=0, max=1, step=0.01, value=None, marks=None,
                              updatemode="mouseup", className="target-slider", allow_direct_input=False),
                   html.Span(id="tradeoff-target-text", className="target-text")],
                  className="target-row")],
        className="controls-bar target-bar",
    )
    return page_layout(
        "tradeoff", "Tradeoff",
        "How many steps and how many examples each batch size needs to reach a target, at its best "
        "learning rate. The frontier S(B) = S_min + E_min/B bends at the critical batch size "
        "B_crit = E_min/S_min.",
        [scope_dropdown("tradeoff-scope"),
         radio_control("Metric", "tradeoff-metric", "train_loss",
                       [{"label": v, "value": k} for k, v in sweeps.TARGET_METRICS.items()]),
         radio_control("Count", "tradeoff-count", "examples",
                       [{"label": v, "value": v} for v in ("examples", "tokens")]),
         radio_control("Smooth the loss over", "tradeoff-smooth", 1,
                       [{"label": "raw" if f == 0 else f"{f}× the largest batch", "value": f}
                        for f in sweeps.SMOOTHING_FACTORS])],
        [html.Div(id="tradeoff-stats", className="stats"),
         html.Div(id="tradeoff-sentence"),
         html.Div(id="tradeoff-notes"),
         html.Div([graph_panel("tradeoff-frontier"), graph_panel("tradeoff-vs-batch")], className="grid-2"),
         graph_panel("tradeoff-vs-target"),
         html.P("McCandlish et al. (2018) predict B_crit ≈ B_noise ≥ B_simple, both growing as the loss "
                "falls. B_simple is measured over the best runs in a window around the step where each "
                "reached the target (ratio of averaged |G|² and tr(Σ) estimates).", className="muted small")],
        above=[target],
    )


scope_callback("tradeoff-scope")

KEY_STEP = math.log10(1.05)  # one arrow key moves a loss target by 5 % (Page Up/Down: 10 steps)
MAX_STEPS = 100  # wider ranges get coarser steps, so the ends stay a few key presses away
MARK_GAP = 0.12  # a range mark this close (fraction of the slider) to the default's label is left out


def slider_grid(lo: float, hi: float, default: float, key_step: float) -> tuple[float, float, float]:
    """(min, max, step) of a slider over [lo, hi] whose step grid passes through `default` exactly (the
    slider snaps to min + k·step), with steps of at least `key_step` and at most MAX_STEPS of them;
    the ends move inwards to the grid, never past lo or hi."""
    span = hi - lo
    if not span > 0:
        return lo, hi, key_step or 1.0
    step = max(key_step, span / MAX_STEPS)
    below = round((default - lo) / step)
    if below > 0:
        step = (default - lo) / below  # lo stays on the grid: every target down to the lowest is reachable
    new_lo = default - below * step
    new_hi = default + math.floor((hi - default) / step + 1e-9) * step
    return new_lo, max(new_hi, default), step


def slider_marks(lo: float, hi: float, default: float, inv) -> dict:
    """Five evenly spaced value marks and 'all batch sizes' at the default; a value mark whose label
    would run into the default's is left out."""
    span = (hi - lo) or 1.0
    marks = {round(v, 4): fmt(inv(v), 2) for v in np.linspace(lo, hi, 5) if abs(v - default) > MARK_GAP * span}
    # near an end the label is shifted inwards (centred on its mark it would stick out of the bar)
    frac = (default - lo) / span
    shift = -50 * frac / 0.08 if frac < 0.08 else (-100 + 50 * (1 - frac) / 0.08 if frac > 0.92 else -50)
    marks[round(default, 4)] = {"label": "all batch sizes", "style": {"color": ACCENT, "whiteSpace": "nowrap",
                                                                      "transform": f"translateX({shift:.0f}%)"}}
    return marks



@callback(
    Output("tradeoff-target", "min"),
    Output("tradeoff-target", "max"),
    Output("tradeoff-target", "value"),
    Output("tradeoff-target", "marks"),
    Output("tradeoff-target", "step"),
    Input("tradeoff-scope", "value"),
    Input("tradeoff-metric", "value"),
    Input("tradeoff-smooth", "value"),
    State("selected-runs", "data"),
)
def tradeoff_slider(scope, metric, smooth, selected):
    """The slider works in log10(target) for losses; it resets to the default when the runs change."""
    db, ids, _, problem = page_scope(scope, selected)
    if problem is not None or not ids:
        return 0, 1, None, None, 0.01
    metric = metric or "train_loss"
    tr = sweeps.target_range(db, ids, metric, sweeps.default_smoothing(db, ids, metric, _factor(smooth)))
    if tr is None:
        return 0, 1, None, None, 0.01
    f = (lambda x: x) if tr.higher_is_better else (lambda x: math.log10(x) if x > 0 else -12)
    inv = (lambda v: v) if tr.higher_is_better else (lambda v: 10 ** v)
    lo, hi, step = slider_grid(f(tr.lo), f(tr.hi), f(tr.default), KEY_STEP if not tr.higher_is_better else 0.0)
    marks = slider_marks(lo, hi, f(tr.default), inv)
    return lo, hi, f(tr.default), marks, step


@callback(
    Output("tradeoff-stats", "children"),
    Output("tradeoff-sentence", "children"),
    Output("tradeoff-notes", "children"),
    Output("tradeoff-frontier", "figure"),
    Output("tradeoff-vs-batch", "figure"),
    Output("tradeoff-vs-target", "figure"),
    Output("tradeoff-target-text", "children"),
    Output("tradeoff-problem", "children"),
    Input("tradeoff-target", "value"),
    Input("store-version", "data"),
    Input("tradeoff-smooth", "value"),
    Input("tradeoff-count", "value"),
    State("tradeoff-scope", "value"),
    State("tradeoff-metric", "value"),
    State("selected-runs", "data"),
)
def update_tradeoff(slider, _version, smooth, count, scope, metric, selected):
    db, ids, scope_label, problem = page_scope(scope, selected)
    blank = empty_figure("")
    if problem is not None:
        return [], None, None, blank, blank, blank, "", problem
    metric = metric or "train_loss"
    target = None
    if slider is not None:
        target = 10 ** slider
    view = tradeoff_view(db, ids, target, metric, _factor(smooth), count or "examples")
    return render(view, scope_label, metric)


def _factor(smooth) -> float:
    return float(smooth) if smooth is not None else 1.0


def render(view: dict, scope_label: str, metric: str):
    fit = view["fit"]
    label = sweeps.TARGET_METRICS[metric]
    t = view["target"]
    text = f"{label} ≤ {fmt(t)}" if t is not None else ""
    if fit is None:
        return [], None, None, view["frontier"], view["vs_batch"], view["vs_target"], text, None
    bs = view.get("b_simple", float("nan"))
    units = view.get("units", EXAMPLES)
    b_simple = stat("B_simple at the target" + _unit_label(units), fmt(bs) if np.isfinite(bs) and bs > 0 else "—",
                    "pooled over the best runs, within ×1.1 of their crossing step", id="tradeoff-bsimple", exact=bs)
    if fit.ok:
        stats = [
            stat("B_crit" + _unit_label(units), fmt(fit.b_crit), _ci(*fit.b_crit_ci), id="tradeoff-bcrit", exact=fit.b_crit),
            stat("S_min", fmt(fit.s_min), _ci(*fit.s_min_ci)),
            stat("E_min" + _unit_label(units), fmt(fit.e_min), _ci(*fit.e_min_ci)),
            stat("Fit", f"R² {fit.r2:.3f}", f"{plural(fit.n_points, 'batch size')} · rms log-residual {fit.rmse_log:.3f}"),
            b_simple,
        ]
        sentence = note(html.P(next_run_sentence(fit, t, label, units), className="takeaway"),
                        "warn" if extrapolated(fit) else "ok")
    else:
        stats = [stat("B_crit", "no fit", fit.reason, id="tradeoff-bcrit"), b_simple]
        sentence = note([html.B("No frontier for this target: "), fit.reason], "warn")
    notes = [html.P(f"Runs: {scope_label}. Best learning rate per batch size (median over seeds). "
                    + smoothing_text(view.get("width", 0.0), metric), className="muted small", id="tradeoff-smoothing")]
    if view.get("missed"):
        notes.append(html.P(view["missed"], className="muted small"))
    if view.get("units_note"):
        notes.append(note("Tokens: " + view["units_note"] + ".", "info"))
    for w in fit.warnings:  # worded by the fit (and its SQL twin) in examples
        notes.append(note(w if units == EXAMPLES else f"In examples (sequences): {w}", "warn"))
    trend = view.get("trend")
    if trend is not None and not trend[2]:
        rho = trend[0]
        notes.append(note(
            "On these runs B_crit does not grow as the target loss falls"
            + (f" (Spearman ρ = {fmt(rho, 2)} against the target)" if np.isfinite(rho) else "")
            + ", unlike McCandlish et al.: the points are drawn without a trend line.", "info"))
    return stats, sentence, notes, view["frontier"], view["vs_batch"], view["vs_target"], text, None
