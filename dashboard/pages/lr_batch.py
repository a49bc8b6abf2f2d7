"""LR × batch: the final metric of every (batch size, learning rate) cell, diverged and unfinished cells
marked, with the base LR η/B as an alternative axis (Masters & Luschi 2018); and the best LR against
batch size with the fit ε_opt(B) = ε_max / (1 + B_noise/B), a second, independent B_noise
(McCandlish et al. 2018). All numbers from dashboard.analysis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dash import Input, Output, State, callback, dcc, html

from dashboard import analysis, queries, sweeps
from dashboard.components import (
    page_header,
    register_page,
    resolve_scope,
    scope_callback,
    scope_dropdown,
    store_problem,
)
from dashboard.theme import (
    ACCENT,
    DANGER,
    MUTED,
    arr,
    batch_color,
    empty_figure,
    figure,
    fmt,
    note,
    stat,
    vline,
)

register_page(__name__, path="/lr-batch", name="LR × batch", title="batchscope · LR × batch", order=5)

METRICS = {
    "final_loss": "final train loss",
    "best_loss": "best train loss",
    "final_test_loss": "final test loss",
    "final_test_accuracy": "final test accuracy",
    "best_test_accuracy": "best test accuracy",
}


def heatmap_figure(smap, axis: str = "lr") -> dict:
    xs, ys, val, state = smap.grid(axis)
    xl = [f"{x:g}" for x in xs]
    yl = [f"{y:.3g}" for y in ys]
    label = METRICS.get(smap.metric, smap.metric)
    higher = not smap.lower_is_better
    z = np.where(np.isfinite(val), val, np.nan)
    zlog = smap.lower_is_better and np.nanmin(z) > 0 if np.isfinite(z).any() else False
    zshow = np.log10(z) if zlog else z
    text = [[(fmt(val[i][j]) if state[i][j] == "ok" else "") for j in range(len(xs))] for i in range(len(ys))]
    traces = [{
        "type": "heatmap", "x": xl, "y": yl, "z": [arr(r) for r in zshow], "text": text, "texttemplate": "%{text}",
        "textfont": {"size": 11}, "colorscale": "Viridis", "reversescale": not higher, "xgap": 2, "ygap": 2,
        "hovertemplate": "B=%{x}, " + ("η/B" if axis == "base_lr" else "lr") + "=%{y}<br>" + label + " %{text}<extra></extra>",
        "colorbar": {"title": {"text": ("log₁₀ " if zlog else "") + label, "side": "right"}, "thickness": 12},
        "hoverongaps": False,
    }]
    marks = {"diverged": ("x", DANGER, "diverged"), "stalled": ("line-ew-open", DANGER, "stalled (never left its initial loss)"),
             "unfinished": ("circle-open", MUTED, "running / stale"),
             "failed": ("square-open", "#c92a2a", "failed")}
    for kind, (symbol, color, name) in marks.items():
        idx = np.argwhere(state == kind)
        if len(idx):
            traces.append({"type": "scatter", "x": [xl[j] for _, j in idx], "y": [yl[i] for i, _ in idx],
                           "mode": "markers", "name": name, "marker": {"symbol": symbol, "size": 16, "color": color,
                                                                         "line": {"width": 3, "color": color}},
                           "hovertemplate": f"{name}<extra></extra>"})
    best = smap.cells.filter(smap.cells["is_best"])
    if best.height:
        traces.append({"type": "scatter", "x": [f"{x:g}" for x in best["batch_size"]],
                       "y": [f"{y:.3g}" for y in best[axis]], "mode": "markers", "name": "best per batch size",
                       "marker": {"symbol": "star", "size": 11, "color": "white", "line": {"width": 1.5, "color": "#111"}},
                       "hovertemplate": "best LR for this batch size<extra></extra>"})
    ytitle = "base LR η/B (per example)" if axis == "base_lr" else "learning rate"
    return figure(traces, f"{label} per batch size and learning rate", height=560,
                  xaxis={"type": "category", "title": {"text": "batch size B"}, "showgrid": False},
                  yaxis={"type": "category", "title": {"text": ytitle}, "showgrid": False},
                  legend={"orientation": "h", "y": -0.16})


def lr_fit_figure(fit) -> dict:
    if fit.n_points == 0:
        return empty_figure(fit.reason or "No best learning rates.")
    traces = [{"type": "scatter", "x": arr(fit.batch_sizes), "y": arr(fit.lrs), "mode": "markers", "name": "best LR",
               "marker": {"color": [batch_color(b) for b in fit.batch_sizes], "size": 12,
                          "line": {"color": "white", "width": 1.5}},
               "hovertemplate": "B=%{x:g}<br>best lr %{y:.3g}<extra></extra>"}]
    shapes, anns = [], []
    if fit.ok:
        c = fit.curve(200)
        traces.append({"type": "scatter", "x": arr(c["batch_size"]), "y": arr(c["lr"]), "mode": "lines",
                       "name": "ε_max / (1 + B_noise/B)", "line": {"color": ACCENT, "width": 2.4}, "hoverinfo": "skip"})
        shape, ann = vline(fit.b_noise, DANGER, "B_noise", log=True)
        shapes.append(shape)
        anns.append(ann)
    return figure(traces, "Best learning rate vs batch size", height=420,
                  xaxis={"type": "log", "title": {"text": "batch size B"}},
                  yaxis={"type": "log", "title": {"text": "best learning rate"}},
                  shapes=shapes, annotations=anns, legend={"orientation": "h", "y": -0.22})


@queries.in_session
def lr_batch_view(db: Path, run_ids: list[str], metric: str = "final_loss", axis: str = "lr") -> dict:
    blank = empty_figure("")
    if not run_ids:
        return {"heatmap": empty_figure("No runs."), "lrfit": blank, "stats": [], "notes": []}
    summary = queries.runs_frame(db, run_ids)
    if metric not in summary.columns or summary[metric].drop_nulls().is_empty():
        return {"heatmap": empty_figure(f"No {METRICS.get(metric, metric)} in these runs."), "lrfit": blank,
                "stats": [], "notes": []}
    # who stalled (never left the initial loss) is decided once, in SQL run_outcomes
    summary = summary.join(queries.run_outcomes(db, run_ids).select("run_id", "outcome"), on="run_id", how="left")
    smap = analysis.stability_map(summary, metric=metric)
    if not smap.ok:
        return {"heatmap": empty_figure(smap.reason), "lrfit": blank, "stats": [], "notes": []}
    heat = heatmap_figure(smap, axis)
    notes, stats = [], []
    by = smap.by_batch
    if by.height:
        widest = by.sort("stable_decades", descending=True, nulls_last=True).row(0, named=True)
        if widest["stable_decades"] is not None:
            stats.append(stat("Widest stable LR range", f"B = {widest['batch_size']:g}",
                              f"{widest['stable_decades']:.2g} decades of LR that trained (no divergence, no stall)"))
    n_div = int(smap.cells["n_diverged"].sum())
    n_stall = int(smap.cells["n_stalled"].sum())
    stats.append(stat("Cells", f"{smap.cells.height}", f"{n_div} diverged run(s) · {n_stall} stalled run(s)",
                      id="lrb-cells"))
    # best LR per batch size at the default target (every batch size reached it) -> lr_scaling
    tr = sweeps.target_range(db, run_ids, "train_loss")
    lrfit = blank
    if tr is not None:
        target = sweeps.snap(tr.default)
        hits = sweeps.hits_for(db, run_ids, (target,), "train_loss")
        fit = analysis.lr_scaling(analysis.best_per_batch(hits))
        width = sweeps.default_smoothing(db, run_ids)
        notes.append(html.P(f"Best LR per batch size: fewest steps to train loss {fmt(target)} (the Tradeoff page's "
                            f"default target), the loss averaged over buckets of {fmt(width)} examples.",
                            className="muted small"))
        lrfit = lr_fit_figure(fit)
        if fit.ok:
            stats.append(stat("B_noise from the best LR", fmt(fit.b_noise),
                              f"90% CI {fmt(fit.b_noise_ci[0])} – {fmt(fit.b_noise_ci[1])}; ε_max {fmt(fit.eps_max)}"))
        else:
            notes.append(note(["No ε_opt(B) fit: ", fit.reason], "info"))
        notes += [note(w, "warn") for w in fit.warnings]
    return {"heatmap": heat, "lrfit": lrfit, "stats": stats, "notes": notes}


def layout(**_kwargs):
    return html.Div(
        [
            page_header(
                "LR × batch",
                "Every (batch size, learning rate) cell of a sweep: which trained, which diverged, which stalled (their "
                "loss never left its starting value, e.g. chance: a failure, not a stable LR), which are still running. Masters & Luschi (2018) report the best results at small batches (2–32), with a wider "
                "range of stable learning rates there.",
                [scope_dropdown("lrb-scope"),
                 html.Div([html.Label("Metric", className="control-label"),
                           dcc.Dropdown(id="lrb-metric", value="final_loss", clearable=False,
                                        options=[{"label": v, "value": k} for k, v in METRICS.items()])],
                          className="control control-wide"),
                 html.Div([html.Label("LR axis", className="control-label"),
                           dcc.RadioItems(id="lrb-axis", value="lr", inline=True, className="radio",
                                          options=[{"label": "LR η", "value": "lr"},
                                                   {"label": "base LR η/B", "value": "base_lr"}])], className="control")],
            ),
            html.Div(id="lrb-problem"),
            dcc.Loading([
                html.Div(id="lrb-stats", className="stats"),
                html.Div(id="lrb-notes"),
                html.Div(dcc.Graph(id="lrb-heatmap", config={"displaylogo": False}), className="panel"),
                html.Div(dcc.Graph(id="lrb-lrfit", config={"displaylogo": False}), className="panel"),
            ], type="default", delay_show=500),
        ]
    )


scope_callback("lrb-scope")


@callback(
    Output("lrb-heatmap", "figure"),
    Output("lrb-lrfit", "figure"),
    Output("lrb-stats", "children"),
    Output("lrb-notes", "children"),
    Output("lrb-problem", "children"),
    Input("lrb-scope", "value"),
    Input("lrb-metric", "value"),
    Input("lrb-axis", "value"),
    Input("store-version", "data"),
    State("selected-runs", "data"),
)
def update_lr_batch(scope, metric, axis, _version, selected):
    db = queries.current_db()
    problem = store_problem(db)
    if problem is not None:
        blank = empty_figure("")
        return blank, blank, [], [], problem
    runs, _ = resolve_scope(db, scope, selected)
    view = lr_batch_view(db, runs["run_id"].to_list(), metric or "final_loss", axis or "lr")
    return view["heatmap"], view["lrfit"], view["stats"], view["notes"], None
