"""Noise scale: B_simple = tr(Σ)/|G|² over training and against the loss, per run and per batch size,
from the SQL macro noise_scale (its one definition: ratio of the window sums of the unbiased estimates
over measured steps within a factor 1 + w of each step, never a mean of per-step ratios), with the
estimator's caveats stated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from dash import Input, Output, State, callback, dcc, html

from dashboard import queries, sweeps
from dashboard.components import (
    page_header,
    register_page,
    resolve_scope,
    run_hover,
    scope_callback,
    scope_dropdown,
    store_problem,
)
from dashboard.theme import arr, batch_color, empty_figure, figure, fmt, note, stat

register_page(__name__, path="/noise", name="Noise scale", title="batchscope · noise scale", order=2)

MAX_RUNS = 40
POINTS_PER_RUN = 300

CAVEATS = [
    html.B("Reading B_simple. "),
    "Each step's |G|² and tr(Σ) estimates are unbiased but very noisy (single-step |G|² is often negative), so "
    "B_simple at step s is the ratio of their sums over the measured steps between s/(1+w) and s·(1+w), a window "
    "centred on s that follows a falling loss (a long moving average lags it); hover shows how many measurements "
    "stand behind each value, and few measurements mean a noisy value. Values are clamped to be positive only "
    "for drawing. ",
    html.B("Batch norm"),
    " (and any layer that mixes examples within a batch) makes each micro-batch's gradient differ from a slice of "
    "the big batch's, which biases the estimate — treat B_simple of batch-norm models as indicative. "
    "Gradient clipping, mixed-precision loss scaling and non-i.i.d. micro-batches bias it too; the trainer measures "
    "the unclipped, unscaled gradient. B_simple ≤ B_noise (it ignores curvature); McCandlish et al. find "
    "B_crit ≈ B_noise, and both grow as the loss falls.",
]


def pick_runs(runs: pl.DataFrame, limit: int = MAX_RUNS) -> tuple[list[str], str]:
    """Runs to draw: every run if few, else the best (lowest final loss) run of each (batch, LR) cell."""
    runs = runs.filter(~pl.col("diverged").fill_null(False))
    if runs.height <= limit:
        return runs["run_id"].to_list(), ""
    best = runs.sort("best_loss", nulls_last=True).unique(["batch_size", "lr"], keep="first", maintain_order=True)
    what = "the best run per batch size and LR"
    if best.height > limit:
        best = best.sort("best_loss", nulls_last=True).unique(["batch_size"], keep="first", maintain_order=True)
        what = "the run with the lowest loss per batch size"
    ids = best.head(limit)["run_id"].to_list()
    return ids, f"showing {len(ids)} of {runs.height} runs ({what})"


def _positive(x) -> str:
    """B_simple for people: a non-positive ratio of averages means |G|^2 is not resolved above the noise yet."""
    if x is None or not np.isfinite(x):
        return "—"
    return fmt(x) if x > 0 else "not resolved (|G|² ≈ 0 within noise)"


def _thin(part: pl.DataFrame, n: int) -> pl.DataFrame:
    if part.height <= n:
        return part
    idx = np.unique(np.linspace(0, part.height - 1, n).astype(int))
    return part[idx]


WINDOWS = (0.05, 0.1, 0.25, 0.5)


@queries.in_session
def noise_view(db: Path, run_ids: list[str], x: str = "examples", window: float = 0.1) -> dict:
    """Figures and headline numbers for the noise-scale page."""
    if not run_ids:
        return {"over": empty_figure("No runs."), "vs_loss": empty_figure(""), "stats": [], "note": ""}
    ids, why = pick_runs(queries.runs_frame(db, run_ids))
    ns = queries.noise_scale(db, sorted(ids), window, max_rows=POINTS_PER_RUN)
    if ns.is_empty() or ns["b_simple"].drop_nulls().is_empty():
        msg = "These runs logged no gradient-noise ingredients (g_small_sq, g_big_sq); train with the trainer's GNS measurement on."
        return {"over": empty_figure(msg), "vs_loss": empty_figure(""), "stats": [], "note": why}
    info = {r["run_id"]: r for r in queries.runs_frame(db, ids).to_dicts()}
    over, vs_loss = [], []
    seen: set = set()
    order = sorted(ns["run_id"].unique().to_list(), key=lambda r: (info.get(r, {}).get("batch_size") or 0, info.get(r, {}).get("lr") or 0))
    # the loss at each measured step: the smoothed training loss of the Tradeoff page (SQL smoothed_loss)
    width = sweeps.default_smoothing(db, ids)
    sm = queries.smoothed_loss(db, sorted(ids), width)
    ns = ns.with_columns(pl.col("step").cast(pl.Float64).alias("_s")).sort("_s").join_asof(
        sm.select("run_id", pl.col("step").cast(pl.Float64).alias("_s"), pl.col("value").alias("smooth_loss"))
        .sort("_s"), on="_s", by="run_id", strategy="nearest", check_sortedness=False,
    ).drop("_s").sort("run_id", "step")
    parts = {k[0]: v for k, v in ns.partition_by("run_id", as_dict=True).items()}
    for rid in order:
        part = _thin(parts[rid].filter(pl.col("b_simple").is_not_null()), POINTS_PER_RUN)
        if part.is_empty():
            continue
        row = info.get(rid, {"run_id": rid})
        b = row.get("batch_size")
        color = batch_color(b)
        first = b not in seen
        seen.add(b)
        y = part["b_simple"].to_numpy()
        y = np.where(y > 0, y, np.nan)  # clamp only for drawing (log axis)
        common = {"type": "scatter", "mode": "lines", "line": {"color": color, "width": 1.6},
                  "name": f"B={b}", "legendgroup": f"B{b}"}
        over.append({**common, "x": arr(part[x]), "y": arr(y), "showlegend": first, "customdata": arr(part["n_noise"]),
                     "hovertemplate": f"{run_hover(row)}<br>{x} %{{x:,.4~g}}<br>B_simple %{{y:.3~g}}"
                                      "<br>from %{customdata} measured steps<extra></extra>"})
        if "smooth_loss" in part.columns:
            loss_at = part["smooth_loss"]
            vs_loss.append({**common, "mode": "markers", "marker": {"color": color, "size": 4, "opacity": 0.6},
                            "x": arr(loss_at), "y": arr(y), "showlegend": first,
                            "hovertemplate": f"{run_hover(row)}<br>loss %{{x:.3~g}}<br>B_simple %{{y:.3~g}}<extra></extra>"})
    last = ns.sort("step").group_by("run_id").agg(pl.col("b_simple").drop_nulls().last(), pl.col("loss").last(),
                                                   pl.col("n_noise").last())
    last = last.join(queries.runs_frame(db, ids).select("run_id", "batch_size"), on="run_id")
    by_b = last.group_by("batch_size").agg(pl.col("b_simple").median()).sort("batch_size")
    stats = [stat("Runs measured", f"{len(parts)}", why or "all runs in scope")]
    if last.height:
        end = last["b_simple"].median()
        stats.append(stat("B_simple at the end", _positive(end), f"median over runs at their last measured step "
                          f"(window ×{1 + window:g})", id="noise-bsimple-end", exact=end))
        early = ns.sort("step").group_by("run_id").agg(pl.col("b_simple").drop_nulls().head(10).median())
        stats.append(stat("… near the start", _positive(early["b_simple"].median()), "median of the first estimates"))
    over_fig = figure(over, "B_simple over training", height=440,
                      xaxis={"title": {"text": {"examples": "examples seen", "step": "step"}[x]}},
                      yaxis={"title": {"text": "B_simple = tr(Σ) / |G|²"}, "type": "log"},
                      legend={"title": {"text": "batch size"}})
    loss_fig = figure(vs_loss, "B_simple vs training loss (grows as the loss falls)", height=440,
                      xaxis={"title": {"text": "training loss (smoothed)"}, "type": "log", "autorange": "reversed"},
                      yaxis={"title": {"text": "B_simple"}, "type": "log"}, showlegend=False)
    table = html.Table(
        [html.Thead(html.Tr([html.Th("batch size"), html.Th("B_simple at the end (median)")]))]
        + [html.Tbody([html.Tr([html.Td(f"{r['batch_size']:g}" if r["batch_size"] is not None else "—"),
                                html.Td(_positive(r["b_simple"]))]) for r in by_b.to_dicts()])],
        className="fit-table",
    )
    return {"over": over_fig, "vs_loss": loss_fig, "stats": stats, "note": why, "table": table}


def layout(**_kwargs):
    return html.Div(
        [
            page_header(
                "Noise scale",
                "The simple noise scale B_simple = tr(Σ)/|G|² measured during training (McCandlish et al. 2018, "
                "App. A). Batches much smaller than it waste nothing; much larger ones mostly average away noise "
                "that no longer exists.",
                [scope_dropdown("noise-scope"),
                 html.Div([html.Label("x axis", className="control-label"),
                           dcc.RadioItems(id="noise-x", value="examples", inline=True, className="radio",
                                          options=[{"label": "examples", "value": "examples"},
                                                   {"label": "step", "value": "step"}])], className="control"),
                 html.Div([html.Label("Window", className="control-label"),
                           dcc.Dropdown(id="noise-window", value=0.1, clearable=False, searchable=False,
                                        options=[{"label": f"step ×/÷ {1 + w:g}", "value": w} for w in WINDOWS])],
                          className="control")],
            ),
            html.Div(id="noise-problem"),
            note(CAVEATS, "info"),
            dcc.Loading([
                html.Div(id="noise-stats", className="stats"),
                html.Div([html.Div(dcc.Graph(id="noise-over-training", config={"displaylogo": False}), className="panel"),
                          html.Div(dcc.Graph(id="noise-vs-loss", config={"displaylogo": False}), className="panel")],
                         className="grid-2"),
                html.Div([html.Div("Per batch size", className="panel-title"), html.Div(id="noise-table")],
                         className="panel"),
            ], type="default", delay_show=500),
        ]
    )


scope_callback("noise-scope")


@callback(
    Output("noise-over-training", "figure"),
    Output("noise-vs-loss", "figure"),
    Output("noise-stats", "children"),
    Output("noise-table", "children"),
    Output("noise-problem", "children"),
    Input("noise-scope", "value"),
    Input("noise-x", "value"),
    Input("noise-window", "value"),
    Input("store-version", "data"),
    State("selected-runs", "data"),
)
def update_noise(scope, x, window, _version, selected):
    db = queries.current_db()
    problem = store_problem(db)
    if problem is not None:
        blank = empty_figure("")
        return blank, blank, [], None, problem
    runs, _label = resolve_scope(db, scope, selected)
    view = noise_view(db, runs["run_id"].to_list(), x or "examples", float(window or 0.1))
    return view["over"], view["vs_loss"], view["stats"], view.get("table"), None
