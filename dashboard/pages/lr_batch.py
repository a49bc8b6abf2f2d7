"""LR × batch: the final metric of every (batch size, learning rate) cell, diverged and unfinished cells
marked, with the base LR η/B as an alternative axis (Masters & Luschi 2018); and the best LR against
batch size with the fit ε_opt(B) = ε_max / (1 + B_noise/B), a second, independent B_noise
(McCandlish et al. 2018); under Adam also Li et al. 2024's rise-and-fall law, and which of the two fits
better. All numbers from dashboard.analysis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dash import Input, Output, State, callback, dcc, html
from plotly.colors import get_colorscale, sample_colorscale

from dashboard import analysis, queries, sweeps
from dashboard.analysis.adam_lr import AdamLRFit, adam_lr_scaling
from dashboard.components import (
    control,
    graph_panel,
    page_layout,
    page_scope,
    radio_control,
    register_page,
    scope_callback,
    scope_dropdown,
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
    plural,
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


MARKS = {"diverged": ("x", DANGER, "diverged"), "stalled": ("line-ew-open", DANGER, "stalled (never left its initial loss)"),
         "unfinished": ("circle-open", MUTED, "running / stale"), "failed": ("square-open", "#c92a2a", "failed")}
BEST_NAME = "best LR per batch size (outlined)"


def colour_scale(smap, val: np.ndarray) -> tuple[list, bool]:
    """Viridis with the better end yellow, on the values as they are, or, for a positive loss (its cells
    span decades), with stops spaced evenly in log(value): the colours follow the log while the figure
    keeps the true values (hover, CSV). Oriented here, so no `reversescale` (which would also mirror
    the stops' positions and undo the log spacing)."""
    z = np.asarray(val, dtype=float)
    z = z[np.isfinite(z)]
    flip = smap.lower_is_better  # low loss, high accuracy: yellow
    if not (smap.lower_is_better and z.size and z.min() > 0 and z.max() > z.min()):
        scale = [[float(p), c] for p, c in get_colorscale("Viridis")]
        return ([[1.0 - p, c] for p, c in reversed(scale)] if flip else scale), False
    lo, hi = float(z.min()), float(z.max())
    k = np.linspace(0.0, 1.0, 11)
    pos = (lo * (hi / lo) ** k - lo) / (hi - lo)
    pos[0], pos[-1] = 0.0, 1.0
    colours = sample_colorscale("Viridis", (1.0 - k).tolist())  # yellow at the lowest loss
    return [[float(p), c] for p, c in zip(pos, colours, strict=True)], True


def _colorbar(label: str, zlog: bool) -> dict:
    return {"title": {"text": label + (" (log colour scale)" if zlog else ""), "side": "right"}, "thickness": 12}


def _legend_only(name: str, symbol: str, color: str) -> dict:
    return {"type": "scatter", "x": [None], "y": [None], "mode": "markers", "name": name, "hoverinfo": "skip",
            "marker": {"symbol": symbol, "size": 14, "color": color, "line": {"width": 2, "color": color}}}


def heatmap_figure(smap, axis: str = "lr") -> dict:
    """LR axis η: a heatmap, values in the cells, the best LR of each batch size outlined (a marker on
    top would hide the value). Base LR η/B: see base_lr_figure."""
    if axis == "base_lr":
        return base_lr_figure(smap)
    xs, ys, val, state = smap.grid(axis)
    xl = [f"{x:g}" for x in xs]
    yl = [f"{y:.3g}" for y in ys]
    label = METRICS.get(smap.metric, smap.metric)
    scale, zlog = colour_scale(smap, val)
    text = [[(fmt(val[i][j]) if state[i][j] == "ok" else "") for j in range(len(xs))] for i in range(len(ys))]
    traces = [{
        "type": "heatmap", "x": xl, "y": yl, "z": [arr(r) for r in val], "text": text, "texttemplate": "%{text}",
        "textfont": {"size": 11}, "colorscale": scale, "xgap": 2, "ygap": 2,
        "hovertemplate": "B=%{x}, lr=%{y}<br>" + label + " %{text}<extra></extra>",
        "colorbar": _colorbar(label, zlog), "hoverongaps": False,
    }]
    for kind, (symbol, color, name) in MARKS.items():
        idx = np.argwhere(state == kind)
        if len(idx):
            traces.append({"type": "scatter", "x": [xl[j] for _, j in idx], "y": [yl[i] for i, _ in idx],
                           "mode": "markers", "name": name, "marker": {"symbol": symbol, "size": 16, "color": color,
                                                                         "line": {"width": 3, "color": color}},
                           "hovertemplate": f"{name}<extra></extra>"})
    shapes = []
    best = smap.cells.filter(smap.cells["is_best"])
    xi, yi = {x: j for j, x in enumerate(xs)}, {y: i for i, y in enumerate(ys)}
    for b, y in zip(best["batch_size"].to_list(), best[axis].to_list(), strict=True):
        j, i = xi[b], yi[y]  # category axes place shapes by a category's index
        shapes.append({"type": "rect", "xref": "x", "yref": "y", "x0": j - 0.46, "x1": j + 0.46, "y0": i - 0.46,
                       "y1": i + 0.46, "line": {"color": "#111", "width": 2.5}, "fillcolor": "rgba(0,0,0,0)"})
    if shapes:
        traces.append(_legend_only(BEST_NAME, "square-open", "#111"))
    return figure(traces, f"{label} per batch size and learning rate", height=560,
                  xaxis={"type": "category", "title": {"text": "batch size B"}, "showgrid": False},
                  yaxis={"type": "category", "title": {"text": "learning rate"}, "showgrid": False},
                  shapes=shapes, legend={"orientation": "h", "y": -0.16})


def _text_colors(z: np.ndarray, reverse: bool) -> list[str]:
    """Black or white text, whichever reads on each value's Viridis colour."""
    lo, hi = np.nanmin(z), np.nanmax(z)
    t = (z - lo) / (hi - lo) if hi > lo else np.full(z.shape, 0.5)
    t = 1 - t if reverse else t
    out = []
    for c in sample_colorscale("Viridis", [float(min(max(v, 0), 1)) for v in t]):
        r, g, b = (float(v) for v in c[c.index("(") + 1:-1].split(","))
        out.append("#111" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white")
    return out


def base_lr_figure(smap, height: int = 560) -> dict:
    """Base LR η/B on a log axis against batch size: every cell at its own η/B, so each batch size's LRs
    sit where they belong instead of on one category row per distinct η/B (thin stripes)."""
    c = smap.cells.filter(smap.cells["base_lr"].is_finite() & (smap.cells["base_lr"] > 0))
    if c.is_empty():
        return empty_figure("No base LR η/B: the runs lack a batch size or an LR.")
    label = METRICS.get(smap.metric, smap.metric)
    xs = sorted(set(c["batch_size"].to_list()))
    xl = {x: f"{x:g}" for x in xs}
    logy = np.log10(c["base_lr"].to_numpy())
    lrs = np.unique(np.log10(c["lr"].to_numpy()))
    gap = float(np.min(np.diff(lrs))) if len(lrs) > 1 else 1.0  # decades between neighbouring LRs of a column
    span = float(logy.max() - logy.min()) + 2 * max(gap, 0.3)
    size = float(np.clip(0.8 * gap * (height - 190) / span, 10, 36))  # ~190 px of margins, title and legend
    traces = []
    ok = c.filter(c["state"] == "ok")
    if ok.height:
        z = ok["value"].to_numpy().astype(float)
        scale, zlog = colour_scale(smap, z)
        traces.append({
            "type": "scatter", "x": [xl[b] for b in ok["batch_size"]], "y": arr(ok["base_lr"]),
            "mode": "markers+text" if size >= 28 else "markers", "name": "cells",
            "text": [fmt(v) for v in ok["value"]], "textfont": {"size": 10, "color": _text_colors(np.log10(z) if zlog else z, smap.lower_is_better)},
            "marker": {"symbol": "square", "size": size, "color": arr(z), "colorscale": scale,
                       "showscale": True,
                       "colorbar": _colorbar(label, zlog)},
            "customdata": [[lr, fmt(v)] for lr, v in zip(ok["lr"].to_list(), ok["value"].to_list(), strict=True)],
            "hovertemplate": "B=%{x}, η/B=%{y:.3g} (lr %{customdata[0]:.3g})<br>" + label + " %{customdata[1]}<extra></extra>",
            "showlegend": False,
        })
    for kind, (symbol, color, name) in MARKS.items():
        k = c.filter(c["state"] == kind)
        if k.height:
            traces.append({"type": "scatter", "x": [xl[b] for b in k["batch_size"]], "y": arr(k["base_lr"]),
                           "mode": "markers", "name": name,
                           "marker": {"symbol": symbol, "size": min(size, 16), "color": color, "line": {"width": 3, "color": color}},
                           "hovertemplate": f"{name}<extra></extra>"})
    best = c.filter(c["is_best"])
    if best.height:
        traces.append({"type": "scatter", "x": [xl[b] for b in best["batch_size"]], "y": arr(best["base_lr"]),
                       "mode": "markers", "name": BEST_NAME, "hoverinfo": "skip",
                       "marker": {"symbol": "square-open", "size": size + 6, "color": "#111", "line": {"width": 2.5}}})
    pad = max(gap, 0.3)
    return figure(traces, f"{label} per batch size and base LR η/B", height=height,
                  xaxis={"type": "category", "title": {"text": "batch size B"}, "showgrid": False,
                         "categoryorder": "array", "categoryarray": [xl[x] for x in xs]},
                  yaxis={"type": "log", "title": {"text": "base LR η/B (per example)"}, "exponentformat": "power",
                         "range": [float(logy.min() - pad), float(logy.max() + pad)]},
                  legend={"orientation": "h", "y": -0.16})


def lr_fit_figure(fit, surge: AdamLRFit | None = None) -> dict:
    """The best LR per batch size with SGD's ε_opt(B) law, and under Adam also the surge law."""
    if fit.n_points == 0:
        return empty_figure(fit.reason or "No best learning rates.")
    traces = [{"type": "scatter", "x": arr(fit.batch_sizes), "y": arr(fit.lrs), "mode": "markers", "name": "best LR",
               "marker": {"color": [batch_color(b) for b in fit.batch_sizes], "size": 12,
                          "line": {"color": "white", "width": 1.5}},
               "hovertemplate": "B=%{x:g}<br>best lr %{y:.3g}<extra></extra>"}]
    shapes, anns = [], []
    if fit.ok or fit.residuals.size:  # at its grid's limit SGD's law is still its best curve: drawn, dashed
        c = fit.curve(200) if fit.ok else None
        if c is not None:
            traces.append({"type": "scatter", "x": arr(c["batch_size"]), "y": arr(c["lr"]), "mode": "lines",
                           "name": "SGD: ε_max / (1 + B_noise/B)", "line": {"color": ACCENT, "width": 2.4},
                           "hoverinfo": "skip"})
            shape, ann = vline(fit.b_noise, ACCENT, "B_noise (SGD law)", log=True)
            shapes.append(shape)
            anns.append(ann)
    if surge is not None and surge.ok:
        c = surge.curve(200)
        traces.append({"type": "scatter", "x": arr(c["batch_size"]), "y": arr(c["lr"]), "mode": "lines",
                       "name": "Adam (Li et al. 2024): peak at B_noise", "line": {"color": DANGER, "width": 2.4, "dash": "dash"},
                       "hoverinfo": "skip"})
        shape, ann = vline(surge.b_noise, DANGER, "B_noise (surge law)", log=True)
        ann = {**ann, "yanchor": "top", "y": 0.94}  # below the SGD law's label
        shapes.append(shape)
        anns.append(ann)
    return figure(traces, "Best learning rate vs batch size", height=420,
                  xaxis={"type": "log", "title": {"text": "batch size B"}},
                  yaxis={"type": "log", "title": {"text": "best learning rate"}},
                  shapes=shapes, annotations=anns, legend={"orientation": "h", "y": -0.22})


def is_adam(summary) -> bool:
    """Most of these runs used an Adam-family optimizer (adam, adamw)."""
    opt = summary["optimizer"].drop_nulls().str.to_lowercase() if "optimizer" in summary.columns else None
    return bool(opt is not None and opt.len() and opt.str.starts_with("adam").mean() > 0.5)


def fit_cards(fit, surge: AdamLRFit | None) -> tuple[list, list]:
    """Stat cards and notes for the LR fits: SGD's law always, and under Adam the surge law and which of the
    two fits the best LRs better (or why one could not be fitted)."""
    stats, notes = [], []
    if fit.ok:
        stats.append(stat("B_noise from the best LR" + (" (SGD law)" if surge else ""), fmt(fit.b_noise),
                          f"90% CI {fmt(fit.b_noise_ci[0])} – {fmt(fit.b_noise_ci[1])}; ε_max {fmt(fit.eps_max)}",
                          id="lrb-bnoise-sgd", exact=fit.b_noise))
    else:
        notes.append(note(["No ε_opt(B) = ε_max/(1 + B_noise/B) fit: ", fit.reason], "info"))
    notes += [note(w, "warn") for w in fit.warnings]
    if surge is None:
        return stats, notes
    if surge.ok:
        stats.append(stat("B_noise, Adam surge law", fmt(surge.b_noise),
                          f"peak LR {fmt(surge.eps_max)}; 90% CI {fmt(surge.b_noise_ci[0])} – {fmt(surge.b_noise_ci[1])}",
                          id="lrb-bnoise-adam", exact=surge.b_noise))
    else:
        notes.append(note(["No rise-and-fall (Li et al. 2024) fit: ", surge.reason], "info"))
    verdict = {"surge": "Adam's rise-and-fall law", "sgd": "SGD's law", "neither": "neither (a tie)"}.get(
        surge.better or "", "no comparison")
    stats.append(stat("Fits the best LRs better", verdict, f"on {plural(surge.n_points, 'batch size')}", id="lrb-better"))
    notes.append(note(["Under Adam, Li et al. (2024) find that the best LR rises as √B, peaks near B_noise and "
                       "then falls as 1/√B; SGD's law rises and saturates. Both are fitted to the same best LRs: ",
                       html.B(surge.comparison + ".")], "info"))
    notes += [note(w, "warn") for w in surge.warnings if w not in fit.warnings]
    return stats, notes


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
                              f"{widest['stable_decades']:.2g} decade{'' if widest['stable_decades'] == 1 else 's'} of LR that trained "
                              "(no divergence, no stall)"))
    n_div = int(smap.cells["n_diverged"].sum())
    n_stall = int(smap.cells["n_stalled"].sum())
    stats.append(stat("Cells", f"{smap.cells.height}", f"{plural(n_div, 'run')} diverged · {plural(n_stall, 'run')} stalled",
                      id="lrb-cells"))
    # best LR per batch size at the default target (every batch size reached it) -> lr_scaling
    tr = sweeps.target_range(db, run_ids, "train_loss")
    lrfit = blank
    if tr is not None:
        target = sweeps.snap(tr.default)
        hits = sweeps.hits_for(db, run_ids, (target,), "train_loss")
        best = analysis.best_per_batch(hits)
        fit = analysis.lr_scaling(best)
        surge = adam_lr_scaling(best) if is_adam(summary) else None
        width = sweeps.default_smoothing(db, run_ids)
        notes.append(html.P(f"Best LR per batch size: fewest steps to train loss {fmt(target)} (the Tradeoff page's "
                            f"default target), the loss averaged over buckets of {fmt(width)} examples.",
                            className="muted small"))
        lrfit = lr_fit_figure(fit, surge)
        more_stats, more_notes = fit_cards(fit, surge)
        stats += more_stats
        notes += more_notes
    return {"heatmap": heat, "lrfit": lrfit, "stats": stats, "notes": notes}


def layout(**_kwargs):
    return page_layout(
        "lrb", "LR × batch",
        "Every (batch size, learning rate) cell of a sweep: which trained, which diverged, which stalled (their "
        "loss never left its starting value, e.g. chance: a failure, not a stable LR), which are still running. Masters & Luschi (2018) report the best results at small batches (2–32), with a wider "
        "range of stable learning rates there.",
        [scope_dropdown("lrb-scope"),
         control("Metric", dcc.Dropdown(id="lrb-metric", value="final_loss", clearable=False,
                                        options=[{"label": v, "value": k} for k, v in METRICS.items()]),
                 extra="control-wide"),
         radio_control("LR axis", "lrb-axis", "lr", [{"label": "LR η", "value": "lr"},
                                                     {"label": "base LR η/B", "value": "base_lr"}])],
        [html.Div(id="lrb-stats", className="stats"),
         html.Div(id="lrb-notes"),
         graph_panel("lrb-heatmap"),
         graph_panel("lrb-lrfit")],
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
    db, ids, _, problem = page_scope(scope, selected)
    if problem is not None:
        blank = empty_figure("")
        return blank, blank, [], [], problem
    view = lr_batch_view(db, ids, metric or "final_loss", axis or "lr")
    return view["heatmap"], view["lrfit"], view["stats"], view["notes"], None
