"""Noise scale: B_simple = tr(Σ)/|G|² over training and against the loss, per run, per batch size or
grouped (dashboard.grouping), from the SQL macro noise_scale (its one definition: ratio of the window sums
of the unbiased estimates over measured steps within a factor 1 + w of each step, never a mean of
per-step ratios), with the estimator's caveats stated. Beside it, where the runs measured them: the
preconditioned B_simple Adam sees (SQL noise_scale_adam) and B_noise from curvature (SQL b_noise_summary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from dash import Input, Output, State, callback, dcc, html

from dashboard import export, queries, sweeps
from dashboard.components import (
    CLICK,
    control,
    graph_panel,
    group_controls,
    group_options,
    grouped_traces,
    page_layout,
    page_scope,
    radio_control,
    register_page,
    run_click,
    run_hover,
    scope_callback,
    scope_dropdown,
)
from dashboard.theme import MUTED, arr, batch_color, empty_figure, figure, fmt, note, stat

register_page(__name__, path="/noise", name="Noise scale", title="batchscope · noise scale", order=2)

MAX_RUNS = 40
POINTS_PER_RUN = 300
X_LABELS = {"examples": "examples seen", "tokens": "tokens seen", "step": "step"}

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
    "the unclipped, unscaled gradient. B_simple ignores curvature: it equals B_noise when the Hessian is a "
    "multiple of the identity; McCandlish et al. find B_crit ≈ B_noise, and both grow as the loss falls.",
]
ADAM_NOTE = [
    html.B("Preconditioned B_simple (dashed). "),
    "Adam does not step along the gradient G but along P·G, with P = 1/(√v̂ + ε) from its second-moment state, so "
    "the noise that matters to it is that of P·g: tr(PΣP)/|PG|² (adaptdl's AdamGradientNoiseScale). Where P is "
    "close to a multiple of the identity the two agree; where Adam rescales noisy coordinates they differ, and the "
    "preconditioned value is the one to compare with Adam's critical batch size. Same window rule as the plain one.",
]
B_NOISE_NOTE = [
    html.B("B_noise (diamonds). "),
    "B_noise = tr(HΣ)/GᵀHG weighs the noise by the curvature H (McCandlish et al. 2018), measured at "
    "evaluations with --curvature; B_simple = tr(Σ)/|G|² is the same with H = I. Their ratio B_noise/B_simple = "
    "[tr(HΣ)/tr(Σ)] / [GᵀHG/|G|²] is the curvature the noise sees over the curvature the gradient sees: B_noise ≤ "
    "B_simple when the gradient points along stiffer directions than the noise, and McCandlish et al. find "
    "B_crit ≈ B_noise. The card compares both on the same micro-batch gradients and counts the runs where "
    "B_noise ≤ B_simple holds.",
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


def _x(frame: pl.DataFrame, x: str, tpe: dict[str, float]) -> pl.DataFrame:
    """Frame with column `_x`: step, examples, or tokens (examples × the run's tokens per example; runs
    without tokens dropped)."""
    if x != "tokens":
        return frame.with_columns(pl.col(x).cast(pl.Float64).alias("_x"))
    return frame.filter(pl.col("run_id").is_in(list(tpe))).with_columns(
        (pl.col("examples") * pl.col("run_id").replace_strict(tpe, default=None, return_dtype=pl.Float64)).alias("_x"))


WINDOWS = (0.05, 0.1, 0.25, 0.5)


@queries.in_session
def noise_view(db: Path, run_ids: list[str], x: str = "examples", window: float = 0.1, group_by=(),
               stat_name: str = "mean", band: str = "minmax") -> dict:
    """Figures, headline numbers and notes for the noise-scale page."""
    if not run_ids:
        return {"over": empty_figure("No runs."), "vs_loss": empty_figure(""), "stats": [], "note": ""}
    x = x if x in X_LABELS else "examples"
    # grouped, every member counts (seed replicas are not the best run of their cell): a larger cap
    ids, why = pick_runs(queries.runs_frame(db, run_ids), MAX_RUNS * (3 if group_by else 1))
    ns = queries.noise_scale(db, sorted(ids), window, max_rows=POINTS_PER_RUN)
    if ns.is_empty() or ns["b_simple"].drop_nulls().is_empty():
        msg = "These runs logged no gradient-noise ingredients (g_small_sq, g_big_sq); train with the trainer's GNS measurement on."
        return {"over": empty_figure(msg), "vs_loss": empty_figure(""), "stats": [], "note": why}
    info = {r["run_id"]: r for r in queries.runs_frame(db, ids).to_dicts()}
    notes = [why] if why else []
    tpe = queries.tokens_per_example(db, ids) if x == "tokens" else {}
    if x == "tokens" and not tpe:
        return {"over": empty_figure("These runs count no tokens (runs.tokens_per_step is NULL): choose examples."),
                "vs_loss": empty_figure(""), "stats": [], "note": why}
    adam = queries.noise_scale_adam(db, sorted(ids), window, max_rows=POINTS_PER_RUN)
    bn_pts = queries.full_scalars(db, ids, ["b_noise"]).join(
        queries.evals_frame(db, ids).select("run_id", "step", "examples").unique(["run_id", "step"]),
        on=["run_id", "step"], how="left")
    bn = queries.b_noise_summary(db, ids)
    # the loss at each measured step: the smoothed training loss of the Tradeoff page (SQL smoothed_loss)
    sm = queries.smoothed_loss(db, sorted(ids), sweeps.default_smoothing(db, ids))
    ns = ns.with_columns(pl.col("step").cast(pl.Float64).alias("_s")).sort("_s").join_asof(
        sm.select("run_id", pl.col("step").cast(pl.Float64).alias("_s"), pl.col("value").alias("smooth_loss"))
        .sort("_s"), on="_s", by="run_id", strategy="nearest", check_sortedness=False,
    ).drop("_s").sort("run_id", "step")
    parts = {k[0]: v for k, v in _x(ns, x, tpe).partition_by("run_id", as_dict=True).items()}
    adam_parts = {k[0]: v for k, v in _x(adam, x, tpe).partition_by("run_id", as_dict=True).items()} if adam.height else {}
    bn_parts = {k[0]: v for k, v in _x(bn_pts, x, tpe).partition_by("run_id", as_dict=True).items()} if bn_pts.height else {}
    order = sorted(parts, key=lambda r: (info.get(r, {}).get("batch_size") or 0, info.get(r, {}).get("lr") or 0))
    over, vs_loss, curves, seen = [], [], {}, set()
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
        curves[rid] = (part["_x"].to_numpy(), y, y)
        common = {"type": "scatter", "mode": "lines", "line": {"color": color, "width": 1.6},
                  "name": f"B={b}", "legendgroup": f"B{b}", "meta": {"run_id": rid}}
        over.append({**common, "x": arr(part["_x"]), "y": arr(y), "showlegend": first, "customdata": arr(part["n_noise"]),
                     "hovertemplate": f"{run_hover(row)}<br>{x} %{{x:,.4~g}}<br>B_simple %{{y:.3~g}}"
                                      f"<br>from %{{customdata}} measured steps{CLICK}<extra></extra>"})
        if rid in adam_parts:
            a = adam_parts[rid].filter(pl.col("b_simple") > 0)
            over.append({**common, "x": arr(a["_x"]), "y": arr(a["b_simple"]), "showlegend": False,
                         "name": f"B={b} preconditioned", "line": {"color": color, "width": 1.4, "dash": "dash"},
                         "hovertemplate": f"{run_hover(row)}<br>{x} %{{x:,.4~g}}<br>B_simple, preconditioned "
                                          f"%{{y:.3~g}}{CLICK}<extra></extra>"})
        if rid in bn_parts:
            p = bn_parts[rid].filter(pl.col("value") > 0)
            over.append({**common, "mode": "markers", "x": arr(p["_x"]), "y": arr(p["value"]), "showlegend": False,
                         "name": f"B={b} B_noise", "marker": {"symbol": "diamond", "size": 8, "color": color,
                                                               "line": {"color": "white", "width": 1}},
                         "hovertemplate": f"{run_hover(row)}<br>{x} %{{x:,.4~g}}<br>B_noise (one evaluation) "
                                          f"%{{y:.3~g}}{CLICK}<extra></extra>"})
        if "smooth_loss" in part.columns:
            vs_loss.append({**common, "mode": "markers", "marker": {"color": color, "size": 4, "opacity": 0.6},
                            "x": arr(part["smooth_loss"]), "y": arr(y), "showlegend": first,
                            "hovertemplate": f"{run_hover(row)}<br>loss %{{x:.3~g}}<br>B_simple %{{y:.3~g}}{CLICK}<extra></extra>"})
    for name, extra in (("preconditioned (dashed)", {"line": {"dash": "dash", "color": MUTED}}),
                        ("B_noise (◆)", {"mode": "markers", "marker": {"symbol": "diamond", "color": MUTED}})):
        if (adam_parts if name.startswith("pre") else bn_parts) and not group_by:  # a legend key, no data
            over.append({"type": "scatter", "mode": "lines", "x": [None], "y": [None], "name": name,
                         "legendgroup": name, "hoverinfo": "skip", **extra})
    if group_by:
        over = grouped_traces(db, curves, info, group_by, stat_name, band, "batch", X_LABELS[x], "B_simple", notes)
        if adam_parts or bn_parts:
            notes.append("grouped: the preconditioned B_simple and B_noise are drawn per run only (ungroup to see them)")
    last = ns.sort("step").group_by("run_id").agg(pl.col("b_simple").drop_nulls().last(), pl.col("n_noise").last())
    last = last.join(queries.runs_frame(db, ids).select("run_id", "batch_size"), on="run_id")
    adam_last = adam.sort("step").group_by("run_id").agg(pl.col("b_simple").drop_nulls().last().alias("b_simple_adam")) \
        if adam.height else pl.DataFrame(schema={"run_id": pl.String, "b_simple_adam": pl.Float64})
    per_run = last.join(adam_last, on="run_id", how="left").join(bn.select("run_id", "b_noise", "b_simple_same_batches"),
                                                                  on="run_id", how="left")
    stats = _stats(ns, per_run, window, why, len(parts))
    over_fig = figure(over, "B_simple over training", height=440, xaxis={"title": {"text": X_LABELS[x]}},
                      yaxis={"title": {"text": "B_simple = tr(Σ) / |G|²"}, "type": "log"},
                      legend={"title": {"text": "group" if group_by else "batch size"}},
                      meta=export.spec("noise_scale", run_ids=sorted(ids), noise_window=window))
    loss_fig = figure(vs_loss, "B_simple vs training loss (grows as the loss falls)", height=440,
                      xaxis={"title": {"text": "training loss (smoothed)"}, "type": "log", "autorange": "reversed"},
                      yaxis={"title": {"text": "B_simple"}, "type": "log"}, showlegend=False,
                      meta=export.spec("noise_scale", run_ids=sorted(ids), noise_window=window))
    explain = ([note(ADAM_NOTE, "info")] if adam.height else []) + ([note(B_NOISE_NOTE, "info")] if bn.height else [])
    return {"over": over_fig, "vs_loss": loss_fig, "stats": stats, "note": "; ".join(n for n in notes if n),
            "table": _table(per_run), "explain": explain,
            "options": group_options(queries.run_configs(db, ids))}


def _stats(ns: pl.DataFrame, per_run: pl.DataFrame, window: float, why: str, n_runs: int) -> list:
    stats = [stat("Runs measured", f"{n_runs}", why or "all runs in scope")]
    if per_run.height:
        end = per_run["b_simple"].median()
        stats.append(stat("B_simple at the end", _positive(end), f"median over runs at their last measured step "
                          f"(window ×{1 + window:g})", id="noise-bsimple-end", exact=end))
        early = ns.sort("step").group_by("run_id").agg(pl.col("b_simple").drop_nulls().head(10).median())
        stats.append(stat("… near the start", _positive(early["b_simple"].median()), "median of the first estimates"))
    adam = per_run["b_simple_adam"].drop_nulls()
    if adam.len():
        stats.append(stat("Preconditioned, at the end", _positive(adam.median()), f"B_simple of Adam's P·g, median of "
                          f"{adam.len()} runs", id="noise-bsimple-adam-end", exact=adam.median()))
    both = per_run.filter(pl.col("b_noise").is_not_null() & pl.col("b_simple_same_batches").is_not_null())
    if both.height:
        below = int((both["b_noise"] <= both["b_simple_same_batches"]).sum())
        stats.append(stat("B_noise (curvature)", _positive(both["b_noise"].median()),
                          f"median of {both.height} runs, last evaluations; B_noise ≤ B_simple on the same batches "
                          f"in {below} of {both.height}", id="noise-bnoise-end", exact=both["b_noise"].median()))
    return stats


def _table(per_run: pl.DataFrame) -> html.Table:
    cols = [("b_simple", "B_simple at the end (median)")]
    if per_run["b_simple_adam"].drop_nulls().len():
        cols.append(("b_simple_adam", "preconditioned B_simple (median)"))
    if per_run["b_noise"].drop_nulls().len():
        cols += [("b_noise", "B_noise (median)"), ("b_simple_same_batches", "B_simple on B_noise's batches")]
    by_b = per_run.group_by("batch_size").agg(*[pl.col(c).median() for c, _ in cols]).sort("batch_size")
    return html.Table(
        [html.Thead(html.Tr([html.Th("batch size")] + [html.Th(t) for _, t in cols]))]
        + [html.Tbody([html.Tr([html.Td(f"{r['batch_size']:g}" if r["batch_size"] is not None else "—")]
                               + [html.Td(_positive(r[c])) for c, _ in cols]) for r in by_b.to_dicts()])],
        className="fit-table", id="noise-table-rows",
    )


def layout(**_kwargs):
    return page_layout(
        "noise", "Noise scale",
        "The simple noise scale B_simple = tr(Σ)/|G|² measured during training (McCandlish et al. 2018, "
        "App. A). Batches much smaller than it waste nothing; much larger ones mostly average away noise "
        "that no longer exists. Click a curve to open its run.",
        [scope_dropdown("noise-scope"),
         radio_control("x axis", "noise-x", "examples", [{"label": k, "value": k} for k in X_LABELS]),
         control("Window", dcc.Dropdown(id="noise-window", value=0.1, clearable=False, searchable=False,
                                        options=[{"label": f"step ×/÷ {1 + w:g}", "value": w} for w in WINDOWS])),
         *group_controls("noise")],
        [html.Div(id="noise-stats", className="stats"),
         html.Div(id="noise-explain"),
         html.Div(id="noise-note", className="muted small"),
         html.Div([graph_panel("noise-over-training", full=True), graph_panel("noise-vs-loss", full=True)],
                  className="grid-2"),
         html.Div([html.Div("Per batch size", className="panel-title"), html.Div(id="noise-table")],
                  className="panel")],
        above=[note(CAVEATS, "info")],
    )


scope_callback("noise-scope")
run_click("noise-over-training")
run_click("noise-vs-loss")


@callback(
    Output("noise-over-training", "figure"),
    Output("noise-vs-loss", "figure"),
    Output("noise-stats", "children"),
    Output("noise-table", "children"),
    Output("noise-problem", "children"),
    Output("noise-explain", "children"),
    Output("noise-note", "children"),
    Output("noise-group", "options"),
    Input("noise-scope", "value"),
    Input("noise-x", "value"),
    Input("noise-window", "value"),
    Input("noise-group", "value"),
    Input("noise-stat", "value"),
    Input("noise-band", "value"),
    Input("store-version", "data"),
    State("selected-runs", "data"),
)
def update_noise(scope, x, window, group_by, stat_name, band, _version, selected):
    db, ids, _, problem = page_scope(scope, selected)
    if problem is not None:
        blank = empty_figure("")
        return blank, blank, [], None, problem, [], "", []
    view = noise_view(db, ids, x or "examples", float(window or 0.1), list(group_by or []),
                      stat_name or "mean", band or "minmax")
    text = view.get("note") or ""
    return (view["over"], view["vs_loss"], view["stats"], view.get("table"), None, view.get("explain", []),
            (text[0].upper() + text[1:] + ".") if text else "", view.get("options", []))
