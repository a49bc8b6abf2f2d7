"""The Tradeoff page's figures (dashboard/pages/tradeoff.py), in examples or in tokens: `units` is (tokens
per example, its name), (1, "examples") by default. Pure: frames and a fit in, Plotly figure dicts out."""

from __future__ import annotations

import numpy as np
import polars as pl

from dashboard.theme import (
    ACCENT,
    DANGER,
    MUTED,
    WARN,
    arr,
    batch_color,
    empty_figure,
    figure,
    fmt,
    hline,
    vline,
)

Units = tuple[float, str]
EXAMPLES: Units = (1.0, "examples")
_BATCH_COLUMNS = ("b_crit", "b_crit_lo", "b_crit_hi", "b_simple", "b_simple_q25", "b_simple_q75")


def _scatter(x, y, **kw) -> dict:
    return {"type": "scatter", "x": arr(x), "y": arr(y), **kw}


def frontier_figure(hits: pl.DataFrame, best: pl.DataFrame, fit, target: float, label: str,
                    units: Units = EXAMPLES) -> dict:
    """Examples (or tokens) vs steps to the target: every run, the best LR per batch size, the fitted
    frontier and its S_min, E_min and B = B_crit point (`fit` already in `units`)."""
    c, unit = units
    reached = hits.filter(pl.col("reached") & pl.col("steps").is_finite())
    if reached.is_empty():
        return empty_figure(f"No run reached {label} {fmt(target)}: move the target up.")
    traces, shapes, anns = [], [], []
    for b, part in sorted(reached.partition_by("batch_size", as_dict=True).items(), key=lambda kv: kv[0][0] or 0):
        bs = b[0]
        traces.append(_scatter(
            part["steps"], part["examples"] * c, mode="markers", name=f"B={bs:g}", showlegend=False,
            marker={"color": batch_color(bs), "size": 7, "opacity": 0.35},
            customdata=[[lr, rid] for lr, rid in zip(part["lr"].to_list(), part["run_id"].to_list(), strict=True)],
            hovertemplate=f"B={bs:g}, lr=%{{customdata[0]:.3g}}<br>S=%{{x:,.0f}} steps<br>E=%{{y:,.0f}} {unit}"
                          "<extra>%{customdata[1]}</extra>",
        ))
    bb = best.filter(pl.col("reached"))
    traces.append(_scatter(
        bb["steps"], bb["examples"] * c, mode="markers", name="best LR per batch size",
        marker={"color": [batch_color(b) for b in bb["batch_size"]], "size": 13, "line": {"color": "white", "width": 1.5}},
        customdata=[[b, lr] for b, lr in zip(bb["batch_size"].to_list(), bb["lr"].to_list(), strict=True)],
        hovertemplate="B=%{customdata[0]:g} (best lr %{customdata[1]:.3g})<br>S=%{x:,.0f}<br>E=%{y:,.0f}<extra></extra>",
    ))
    if fit.ok:
        fr = fit.frontier(200)
        traces.append(_scatter(fr["steps"], fr["examples"], mode="lines", name="fitted frontier",
                               line={"color": ACCENT, "width": 2.5}, hoverinfo="skip"))
        for shape, ann in (vline(fit.s_min, MUTED, "S_min", "dot", log=True), hline(fit.e_min, MUTED, "E_min", log=True)):
            shapes.append(shape)
            anns.append(ann)
        traces.append(_scatter([2 * fit.s_min], [2 * fit.e_min], mode="markers+text", name="B = B_crit",
                               text=[f"  B_crit ≈ {fmt(fit.b_crit)}"], textposition="middle right",
                               marker={"symbol": "star", "size": 16, "color": DANGER},
                               hovertemplate="B_crit: S = 2 S_min, E = 2 E_min<extra></extra>"))
    return figure(traces, f"Examples vs steps to reach {label} {fmt(target)}", height=470,
                  xaxis={"type": "log", "title": {"text": "steps to target S"}},
                  yaxis={"type": "log", "title": {"text": f"{unit} to target E"}},
                  shapes=shapes, annotations=anns, legend={"orientation": "h", "y": -0.2})


def steps_vs_batch_figure(hits: pl.DataFrame, best: pl.DataFrame, fit, target: float,
                          units: Units = EXAMPLES) -> dict:
    """Steps to the target against the batch size (in examples or tokens), with S_min + E_min / B and B_crit."""
    c, unit = units
    reached = hits.filter(pl.col("reached") & pl.col("steps").is_finite())
    if reached.is_empty():
        return empty_figure("")
    traces, shapes, anns = [], [], []
    traces.append(_scatter(
        reached["batch_size"] * c, reached["steps"], mode="markers", name="every run",
        marker={"color": [batch_color(b) for b in reached["batch_size"]], "size": 6, "opacity": 0.35},
        customdata=arr(reached["lr"]), hovertemplate="B=%{x:g}, lr=%{customdata:.3g}<br>S=%{y:,.0f}<extra></extra>",
    ))
    bb = best.filter(pl.col("reached"))
    traces.append(_scatter(
        bb["batch_size"] * c, bb["steps"], mode="markers", name="best LR",
        marker={"color": [batch_color(b) for b in bb["batch_size"]], "size": 12, "line": {"color": "white", "width": 1.5}},
        hovertemplate="B=%{x:g}<br>S=%{y:,.0f}<extra>best LR</extra>",
    ))
    if fit.ok:
        fr = fit.frontier(200)
        traces.append(_scatter(fr["batch_size"], fr["steps"], mode="lines", name="S_min + E_min / B",
                               line={"color": ACCENT, "width": 2.5}, hoverinfo="skip"))
        shape, ann = vline(fit.b_crit, DANGER, "B_crit", log=True)
        shapes.append(shape)
        anns.append(ann)
        lo, hi = fit.b_crit_ci
        if np.isfinite(lo) and np.isfinite(hi) and lo > 0:
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": lo, "x1": hi,
                           "y0": 0, "y1": 1,
                           "fillcolor": DANGER, "opacity": 0.08, "line": {"width": 0}})
    return figure(traces, "Steps to target vs batch size", height=470,
                  xaxis={"type": "log", "title": {"text": "batch size B" + ("" if unit == "examples" else f" ({unit})")}},
                  yaxis={"type": "log", "title": {"text": "steps to target S"}},
                  shapes=shapes, annotations=anns, legend={"orientation": "h", "y": -0.2})


def vs_target_figure(vs: pl.DataFrame, label: str, higher: bool, grows: bool = True,
                     units: Units = EXAMPLES) -> dict:
    """B_crit and B_simple against the target: a line only when B_crit does grow as the target falls."""
    c, unit = units
    vs = vs.with_columns(pl.col(k) * c for k in _BATCH_COLUMNS if k in vs.columns)
    ok = vs.filter(pl.col("reason").is_null() & pl.col("b_crit").is_finite())
    traces = []
    if ok.height:
        bc, blo, bhi = (ok[c].to_numpy().astype(float) for c in ("b_crit", "b_crit_lo", "b_crit_hi"))
        lo = np.where(np.isfinite(blo), bc - blo, np.nan)
        hi = np.where(np.isfinite(bhi), bhi - bc, np.nan)
        traces.append(_scatter(ok["target"], ok["b_crit"], mode="lines+markers" if grows else "markers",
                               name="B_crit (fit, 90% CI)",
                               line={"color": ACCENT, "width": 2.2}, marker={"size": 8},
                               error_y={"type": "data", "symmetric": False, "array": arr(hi), "arrayminus": arr(lo),
                                        "color": ACCENT, "thickness": 1.2},
                               hovertemplate="target %{x:.3g}<br>B_crit %{y:.3g}<extra></extra>"))
    ns = vs.filter(pl.col("b_simple").is_finite() & (pl.col("b_simple") > 0))
    if ns.height:
        q = ns.filter(pl.col("b_simple_q25").is_finite() & pl.col("b_simple_q75").is_finite())
        if q.height:
            t = q["target"].to_list()
            traces.append(_scatter(t + t[::-1], q["b_simple_q75"].to_list() + q["b_simple_q25"].to_list()[::-1],
                                   fill="toself", fillcolor="rgba(232,89,12,0.10)", line={"width": 0},
                                   name="B_simple across best runs (IQR)", hoverinfo="skip"))
        traces.append(_scatter(ns["target"], ns["b_simple"], mode="lines+markers",
                               name="B_simple measured at the crossing (best runs, pooled)",
                               line={"color": WARN, "width": 2.2, "dash": "dash"}, marker={"size": 7, "symbol": "diamond"},
                               hovertemplate="target %{x:.3g}<br>B_simple %{y:.3g}<extra></extra>"))
    if not traces:
        reasons = vs["reason"].drop_nulls().unique().to_list()
        return empty_figure("No target has a fit" + (f": {reasons[0]}" if reasons else "."))
    title = (f"B_crit and B_simple as the {label} target falls" if grows
             else f"B_crit per {label} target (no trend with the target on these runs)")
    return figure(traces, title, height=430,
                  xaxis={"title": {"text": f"target {label}"}, "type": "linear" if higher else "log",
                         "autorange": True if higher else "reversed"},
                  yaxis={"title": {"text": "batch size" + ("" if unit == "examples" else f" ({unit})")}, "type": "log"},
                  legend={"orientation": "h", "y": -0.25})
