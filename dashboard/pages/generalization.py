"""Generalization: the test − train gap against batch size (Keskar et al. 2016) and against the SGD noise
scale g = εN/(B(1−m)) (Smith et al. 2017), read at matched training progress (dashboard.analysis); beside
it, the sharpness (top Hessian eigenvalue, scalar `sharpness`, trainer --curvature) each run ended at,
Keskar's proposed mechanism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from dash import Input, Output, State, callback, html

from dashboard import analysis, queries
from dashboard.analysis.generalization import _spearman
from dashboard.components import (
    graph_panel,
    page_layout,
    page_scope,
    radio_control,
    register_page,
    scope_callback,
    scope_dropdown,
)
from dashboard.theme import ACCENT, arr, batch_color, empty_figure, figure, fmt, note, plural, stat

register_page(__name__, path="/generalization", name="Generalization", title="batchscope · generalization", order=4)

GAPS = {"gap_loss": "test − train loss", "gap_accuracy": "train − test accuracy"}
WHY_MATCHED_LOSS = ("Read at matched training loss: every run where its training loss (train-split evaluation) first "
                    "reaches the same level, the lowest one every batch size reached. Keskar et al. compare minima of "
                    "similar training loss; at matched examples a large batch has taken few steps and barely trained, "
                    "so its small gap would mean under-fitted, not better generalization.")


def spread(batch_sizes) -> np.ndarray:
    """x positions for runs drawn at their batch size on a log axis: runs sharing a batch size are fanned
    out by at most ±6 % in a fixed order, a lone run stays exactly on its batch size."""
    b = np.asarray(batch_sizes, dtype=float)
    out = b.copy()
    for v in np.unique(b[np.isfinite(b)]):
        idx = np.flatnonzero(b == v)
        if len(idx) > 1:
            out[idx] = v * np.exp(np.linspace(-0.06, 0.06, len(idx)))
    return out


def batch_axis(batch_sizes) -> dict:
    """A log x axis labelled at the batch sizes drawn, with room either side (one batch size included:
    plotly's autorange would zoom onto a sliver around it)."""
    b = np.unique(np.asarray(batch_sizes, dtype=float))
    b = b[np.isfinite(b) & (b > 0)]
    if not b.size:
        return {"type": "log", "title": {"text": "batch size B"}}
    return {"type": "log", "title": {"text": "batch size B"}, "tickvals": b.tolist(), "ticktext": [f"{v:g}" for v in b],
            "range": [float(np.log10(b.min() / 1.6)), float(np.log10(b.max() * 1.6))]}


@queries.in_session
def sharpness_view(db: Path, run_ids: list[str]) -> tuple[dict, list]:
    """Sharpness at the end (the last `sharpness` scalar of each run) against batch size, and its
    Spearman correlation with the batch size."""
    sh = queries.final_scalar(db, run_ids, "sharpness")
    if sh.is_empty():
        return empty_figure("No sharpness recorded for these runs: train with --curvature "
                            "(the charlm sample sweep has it).", height=440), []
    sh = sh.join(queries.runs_frame(db, run_ids).select("run_id", "name", "batch_size", "lr"), on="run_id").filter(
        pl.col("batch_size").is_not_null())
    med = sh.group_by("batch_size").agg(pl.col("value").median()).sort("batch_size")
    hover = [f"{n}<br>B={b:g}, lr={fmt(lr)}<br>sharpness {fmt(v)} at step {st:,}" for n, b, lr, v, st in
             zip(sh["name"].to_list(), sh["batch_size"].to_list(), sh["lr"].fill_null(np.nan).to_list(),
                 sh["value"].to_list(), sh["step"].to_list(), strict=True)]
    traces = [
        {"type": "scatter", "x": arr(spread(sh["batch_size"].to_numpy())), "y": arr(sh["value"]), "mode": "markers",
         "marker": {"color": [batch_color(b) for b in sh["batch_size"]], "size": 8, "opacity": 0.75,
                    "line": {"color": "white", "width": 0.5}}, "text": hover, "hoverinfo": "text", "name": "runs"},
        {"type": "scatter", "x": arr(med["batch_size"]), "y": arr(med["value"]), "mode": "markers", "name": "median",
         "marker": {"size": 9, "symbol": "diamond", "color": ACCENT},
         "hovertemplate": "B=%{x:g}<br>median sharpness %{y:.3~g}<extra></extra>"},
    ]
    fig = figure(traces, "Sharpness at the end vs batch size", height=440, xaxis=batch_axis(sh["batch_size"]),
                 yaxis={"type": "log" if (sh["value"] > 0).all() else "linear",
                        "title": {"text": "top Hessian eigenvalue λ_max"}}, legend={"orientation": "h", "y": -0.2})
    rho, p = _spearman(sh["batch_size"].to_numpy().astype(float), sh["value"].to_numpy().astype(float))
    return fig, [stat("Sharpness vs batch size", f"ρ = {fmt(rho, 2)}", f"Spearman, p = {fmt(p, 2)}, "
                      + plural(sh.height, "run"), id="gen-sharpness-rho")]


@queries.cached_by_runs
def gen_result(db: Path, run_ids: tuple[str, ...], at: str = "train_loss"):
    runs = queries.runs_frame(db, list(run_ids)).join(
        queries.run_outcomes(db, list(run_ids)).select("run_id", "outcome"), on="run_id", how="left")
    evals = queries.evals_frame(db, list(run_ids))
    if evals.is_empty():
        return None
    return analysis.generalization(evals, runs, at=at)


@queries.in_session
def generalization_view(db: Path, run_ids: list[str], at: str = "train_loss", gap: str = "gap_loss") -> dict:
    """The page's figures (batch, noise, sharpness), stat cards and notes for these runs."""
    view = gap_view(db, run_ids, at, gap)
    view["sharpness"], sharp_stats = sharpness_view(db, run_ids) if run_ids else (empty_figure(""), [])
    view["stats"] = view["stats"] + sharp_stats
    return view


def gap_view(db: Path, run_ids: list[str], at: str, gap: str) -> dict:
    blank = empty_figure("")
    if not run_ids:
        return {"batch": empty_figure("No runs."), "noise": blank, "stats": [], "notes": []}
    res = gen_result(db, tuple(sorted(run_ids)), at)
    if res is None:
        return {"batch": empty_figure("These runs logged no evaluations (train and test splits)."), "noise": blank,
                "stats": [], "notes": []}
    if not res.ok:
        return {"batch": empty_figure(res.reason), "noise": blank, "stats": [],
                "notes": [note(res.reason, "warn")]}
    per, by = res.per_run, res.by_batch
    label = GAPS[gap]
    if per[gap].drop_nulls().is_empty():
        return {"batch": empty_figure(f"No {label} for these runs (accuracy not logged?)."), "noise": blank,
                "stats": [], "notes": []}
    colors = [batch_color(b) for b in per["batch_size"]]
    hover = [f"B={b:g}, lr={lr:.3g}<br>{label}: {fmt(g)}<br>{r}" for b, lr, g, r in
             zip(per["batch_size"].to_list(), per["lr"].fill_null(np.nan).to_list(), per[gap].fill_null(np.nan).to_list(),
                 per["run_id"].to_list(), strict=True)]
    rho, p = res.rho_batch, res.p_batch
    grows = bool(np.isfinite(rho) and rho > 0 and p < 0.1)
    batch_traces = [
        {"type": "scatter", "x": arr(spread(per["batch_size"].to_numpy())), "y": arr(per[gap]), "mode": "markers",
         "marker": {"color": colors, "size": 8, "opacity": 0.7, "line": {"color": "white", "width": 0.5}},
         "text": hover, "hoverinfo": "text", "name": "runs"},
        {"type": "scatter", "x": arr(by["batch_size"]), "y": arr(by[gap]), "mode": "lines+markers" if grows else "markers",
         "name": "median",
         "line": {"color": ACCENT, "width": 2.4}, "marker": {"size": 9, "symbol": "diamond"},
         "hovertemplate": "B=%{x:g}<br>median %{y:.3~g}<extra></extra>"},
    ]
    batch_fig = figure(batch_traces, f"Generalization gap vs batch size — at {res.at}", height=440,
                       xaxis=batch_axis(per["batch_size"]),
                       yaxis={"title": {"text": label}}, legend={"orientation": "h", "y": -0.2})
    g = per.filter(pl.col("noise_g").is_finite() & (pl.col("noise_g") > 0))
    if g.height:
        noise_fig = figure(
            [{"type": "scatter", "x": arr(g["noise_g"]), "y": arr(g[gap]), "mode": "markers",
              "marker": {"color": [batch_color(b) for b in g["batch_size"]], "size": 8, "opacity": 0.75,
                         "line": {"color": "white", "width": 0.5}},
              "text": [f"B={b:g}, lr={lr:.3g}" for b, lr in zip(g["batch_size"].to_list(), g["lr"].to_list(), strict=True)],
              "hovertemplate": "%{text}<br>g=%{x:.3~g}<br>gap %{y:.3~g}<extra></extra>", "name": "runs"}],
            "Gap vs SGD noise scale g = εN / (B(1−m))", height=440,
            xaxis={"type": "log", "title": {"text": "g = lr · N / (B (1 − momentum))"}},
            yaxis={"title": {"text": label}}, showlegend=False)
    else:
        noise_fig = empty_figure("g needs the training-set size N (train_size) and the LR of each run.")
    stats = [
        stat("Read at", res.at, plural(per.height, "run")),
        stat("Gap vs batch size", f"ρ = {fmt(res.rho_batch, 2)}", f"Spearman, p = {fmt(res.p_batch, 2)}"),
        stat("Gap vs g", f"ρ = {fmt(res.rho_noise, 2)}", f"Spearman, p = {fmt(res.p_noise, 2)}"),
    ]
    have = by.filter(pl.col(gap).is_not_null())
    if have.height >= 2:
        lo, hi = have.row(0, named=True), have.row(have.height - 1, named=True)
        stats.append(stat(f"Median gap B={lo['batch_size']:g} → {hi['batch_size']:g}",
                          f"{fmt(lo[gap])} → {fmt(hi[gap])}", label))
    notes = [note(WHY_MATCHED_LOSS, "info")] if at == "train_loss" else []
    notes += [note(w, "warn") for w in res.warnings]
    if not grows:
        notes.append(note("On these runs the gap does not grow with batch size"
                          + (f" (Spearman ρ = {fmt(rho, 2)}, p = {fmt(p, 2)})" if np.isfinite(rho) else "")
                          + ", unlike Keskar et al.: the medians are drawn without a trend line.", "info"))
    return {"batch": batch_fig, "noise": noise_fig, "stats": stats, "notes": notes}


def layout(**_kwargs):
    return page_layout(
        "gen", "Generalization",
        "Do large batches generalize worse (Keskar et al. 2016), and is it the batch size or the SGD noise "
        "scale g = εN/(B(1−m)) that matters (Smith et al. 2017)?",
        [scope_dropdown("gen-scope"),
         radio_control("Gap", "gen-gap", "gap_loss", [{"label": "loss", "value": "gap_loss"},
                                                      {"label": "accuracy", "value": "gap_accuracy"}]),
         radio_control("Read at", "gen-at", "train_loss", [{"label": "matched training loss", "value": "train_loss"},
                                                           {"label": "matched examples", "value": "matched"},
                                                           {"label": "end of training", "value": "end"}])],
        [html.Div(id="gen-stats", className="stats"),
         html.Div(id="gen-notes"),
         html.Div([graph_panel("gen-vs-batch"), graph_panel("gen-sharpness")], className="grid-2"),
         graph_panel("gen-vs-noise")],
    )


scope_callback("gen-scope")


@callback(
    Output("gen-vs-batch", "figure"),
    Output("gen-vs-noise", "figure"),
    Output("gen-sharpness", "figure"),
    Output("gen-stats", "children"),
    Output("gen-notes", "children"),
    Output("gen-problem", "children"),
    Input("gen-scope", "value"),
    Input("gen-gap", "value"),
    Input("gen-at", "value"),
    Input("store-version", "data"),
    State("selected-runs", "data"),
)
def update_generalization(scope, gap, at, _version, selected):
    db, ids, _, problem = page_scope(scope, selected)
    if problem is not None:
        blank = empty_figure("")
        return blank, blank, blank, [], [], problem
    view = generalization_view(db, ids, at or "train_loss", gap or "gap_loss")
    return view["batch"], view["noise"], view["sharpness"], view["stats"], view["notes"], None
