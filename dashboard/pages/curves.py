"""Curves: loss, accuracy, learning rate, batch size or B_simple over steps, examples, tokens or wall time,
per run or grouped (mean or median of seed replicas or any config key, with a band).

Long runs are downsampled in DuckDB (queries.step_curves: equal-width step buckets, a point budget shared
by the runs drawn); the smoothing is a debiased EMA over steps, applied to the bucket means with each
bucket weighted by the number of steps it holds, so the slider means the same thing at any zoom or run
length. Groups aggregate the smoothed member curves (dashboard.grouping: on a common grid within the
members' overlap). Every plot exports PNG/SVG, the drawn points and the stored rows (dashboard.export).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from dash import Input, Output, callback, dcc, html

from dashboard import export, queries
from dashboard.components import (
    CLICK,
    QUALITATIVE,
    control,
    group_controls,
    group_options,
    grouped_traces,
    radio_control,
    register_page,
    run_click,
    run_hover,
    run_href,
    run_label,
)
from dashboard.theme import DANGER, arr, batch_color, empty_figure, figure

register_page(__name__, path="/curves", name="Curves", title="batchscope · curves", order=1)

METRICS = {
    "loss": ("train loss (per step)", "step"),
    "test_loss": ("test loss", "eval"),
    "train_eval_loss": ("train loss (eval)", "eval"),
    "test_accuracy": ("test accuracy", "eval"),
    "train_accuracy": ("train accuracy (eval)", "eval"),
    "lr": ("learning rate", "step"),
    "batch_size": ("batch size", "step"),
    "b_simple": ("B_simple (centred window, as on Noise scale)", "noise"),
    "b_simple_online": ("B_simple (trainer's online estimate)", "step"),
}
STEP_COLUMN = {"b_simple_online": "b_simple"}  # curve name -> steps column
X_LABELS = {"step": "step", "examples": "examples seen", "tokens": "tokens seen", "wall_time": "wall time (s)"}
MAX_RUNS = 200  # the point budget is shared, so more runs only means coarser buckets
POINT_BUDGET = 12_000  # points per figure (before the faint raw copy)


def debiased_ema(y: np.ndarray, weight: float, n: np.ndarray | None = None) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard's smoothing); point i stands for n[i] steps."""
    if weight <= 0 or len(y) == 0:
        return y
    n = np.ones(len(y)) if n is None else np.asarray(n, dtype=float)
    decay = np.power(weight, n).tolist()
    out = np.empty(len(y))
    m = 0.0
    norm = 0.0
    for i, (v, a) in enumerate(zip(y.tolist(), decay, strict=True)):
        m = a * m + (1.0 - a) * v
        norm = a * norm + (1.0 - a)
        out[i] = m / norm
    return out


def default_runs(db: Path) -> tuple[list[str], str]:
    """Runs to show when none are selected: the latest sweep's (or the latest runs)."""
    ov = queries.overview(db)
    table = queries.run_table(db)
    if ov.sweeps:
        table = table.filter(pl.col("sweep") == ov.sweeps[0])
        why = f"Nothing selected: showing sweep {ov.sweeps[0]}"
    else:
        why = "Nothing selected: showing the latest runs"
    return table["run_id"].to_list(), why


def _series(db: Path, ids: list[str], metric: str, x: str, notes: list[str]) -> tuple[pl.DataFrame, dict]:
    """Per-run points (run_id, x, y, n) of a metric, and the export spec of their stored rows."""
    _label, source = METRICS[metric]
    qx = "examples" if x == "tokens" else x
    per_run = max(100, POINT_BUDGET // max(1, len(ids)))
    if source == "noise":  # the one offline definition (SQL noise_scale), exactly as the Noise page draws it
        ns = queries.noise_scale(db, ids, max_rows=per_run)
        if qx not in ns.columns:
            notes.append("B_simple is drawn against step (no wall time per measured step)")
            qx = "step"
        notes.append("B_simple: ratio of the sums of tr(Σ) and |G|² over measured steps within ×1.1 of each step")
        data = ns.select("run_id", pl.col(qx).cast(pl.Float64).alias("x"),
                         pl.when(pl.col("b_simple") > 0).then(pl.col("b_simple")).alias("y"), n=pl.lit(1))
        spec = export.spec("noise_scale", run_ids=ids, noise_window=0.1)
    elif source == "step":
        data = queries.step_curves(db, ids, STEP_COLUMN.get(metric, metric), qx, per_run)
        if data.height and int(data["n"].max()) > 1:
            notes.append(f"long runs averaged into ≤{per_run:,} points each (in DuckDB; CSV, full resolution: every step)")
        data = data.select("run_id", "x", "y", "n")
        spec = export.spec("steps", run_ids=ids, columns=[STEP_COLUMN.get(metric, metric)])
    else:
        split = "test" if metric.startswith("test") else "train"
        what = "accuracy" if metric.endswith("accuracy") else "loss"
        data = queries.eval_curves(db, ids, what, qx, (split,)).select("run_id", "x", "y", n=pl.lit(1))
        spec = export.spec("evals", run_ids=ids)
    if x == "tokens":
        tpe = queries.tokens_per_example(db, ids)
        without = sorted(set(data["run_id"].unique().to_list()) - set(tpe))
        if without:
            notes.append(f"{len(without)} runs count no tokens (runs.tokens_per_step is NULL) and are left out")
        data = data.filter(pl.col("run_id").is_in(list(tpe))).with_columns(
            pl.col("x") * pl.col("run_id").replace_strict(tpe, default=None, return_dtype=pl.Float64))
    return data, spec


@queries.in_session
def curves_figure(db: Path, run_ids: Sequence[str], metric: str = "loss", x: str = "step",
                  smoothing: float = 0.6, log_x: bool = False, log_y: bool = False,
                  color_by: str = "batch", group_by: Sequence[str] = (), stat: str = "mean",
                  band: str = "minmax") -> tuple[dict, str]:
    """The curves figure and a one-line note (what is shown, how groups were aligned)."""
    if metric not in METRICS or x not in X_LABELS:
        return empty_figure(f"Unknown metric {metric!r} or x axis {x!r}."), ""
    if not run_ids:
        return empty_figure("No runs to show: select runs on the Runs page."), ""
    ids = list(run_ids)[:MAX_RUNS]
    notes: list[str] = []
    info = {r["run_id"]: r for r in queries.runs_frame(db, ids).to_dicts()}
    label, source = METRICS[metric]
    data, spec = _series(db, ids, metric, x, notes)
    order = sorted(ids, key=lambda i: (info.get(i, {}).get("batch_size") or 0, info.get(i, {}).get("lr") or 0))
    parts = {k[0]: v for k, v in data.partition_by("run_id", as_dict=True).items()} if data.height else {}
    smooth = smoothing if metric in ("loss", "b_simple_online") else 0.0
    mode = "lines+markers" if source == "eval" else "lines"
    curves = {}  # run id -> (x, raw y, drawn y)
    for rid in order:
        if rid in parts and not parts[rid].is_empty():
            p = parts[rid]
            ys = p["y"].cast(pl.Float64).to_numpy()
            curves[rid] = (p["x"].to_numpy(), ys, debiased_ema(ys, smooth, p["n"].to_numpy()) if smooth > 0 else ys)
    xl = X_LABELS[x]
    traces: list[dict] = []
    if group_by:
        traces = grouped_traces(db, curves, info, group_by, stat, band, color_by, xl, label, notes)
    else:
        seen: set = set()
        for k, rid in enumerate(curves):
            row = info.get(rid, {"run_id": rid})
            xs, raw, ys = curves[rid]
            color = batch_color(row.get("batch_size")) if color_by == "batch" else QUALITATIVE[k % len(QUALITATIVE)]
            legend = _legend(row, color_by, seen)
            if smooth > 0:
                traces.append({"type": "scatter", "x": arr(xs), "y": arr(raw), "mode": "lines", "name": f"{run_label(row)} (raw)",
                               "line": {"color": color, "width": 1}, "opacity": 0.22, "hoverinfo": "skip",
                               "showlegend": False, "legendgroup": legend["legendgroup"], "meta": {"run_id": rid}})
            traces.append({"type": "scatter", "x": arr(xs), "y": arr(ys), "mode": mode, "marker": {"size": 4},
                           "line": {"color": color, "width": 1.8}, **legend, "meta": {"run_id": rid},
                           "hovertemplate": f"{run_hover(row)}<br>{xl} %{{x:,.4~g}}<br>{label} %{{y:.4~g}}{CLICK}<extra></extra>"})
            if row.get("diverged") and source == "step":
                traces.append({"type": "scatter", "x": [float(xs[-1])], "y": [float(ys[-1])], "mode": "markers",
                               "marker": {"symbol": "x", "size": 11, "color": DANGER}, "showlegend": False,
                               "name": f"{run_label(row)} diverged", "meta": {"run_id": rid},
                               "hovertemplate": f"{run_label(row)} diverged here{CLICK}<extra></extra>"})
    if not traces:
        return empty_figure(f"The chosen runs have no {label} logged" + (" against tokens." if x == "tokens" else ".")), \
            "; ".join(notes)
    fig = figure(
        traces, height=560, hovermode="closest", uirevision=f"{metric}-{x}",
        xaxis={"title": {"text": xl}, "type": "log" if log_x else "linear"},
        yaxis={"title": {"text": label}, "type": "log" if log_y else "linear"}, meta=spec,
    )
    fig["layout"]["legend"]["title"] = {"text": "group" if group_by else "batch size" if color_by == "batch" else "run"}
    return fig, "; ".join(notes)


def _legend(row: dict, color_by: str, seen: set) -> dict:
    if color_by == "batch":
        b = row.get("batch_size")
        first = b not in seen
        seen.add(b)
        return {"name": f"B={b}", "legendgroup": f"B{b}", "showlegend": first}
    return {"name": run_label(row), "legendgroup": row["run_id"], "showlegend": True}


def left_out(db: Path, run_ids: Sequence[str]) -> html.Details | None:
    """The runs beyond MAX_RUNS, each linked to its run page, and how to see them."""
    rest = list(run_ids)[MAX_RUNS:]
    if not rest:
        return None
    info = {r["run_id"]: r for r in queries.runs_frame(db, rest).to_dicts()}
    return html.Details([
        html.Summary(f"{len(rest)} of {len(run_ids)} runs are not drawn (at most {MAX_RUNS} per plot): which"),
        html.P("To see them, select fewer runs on the Runs page (the curves follow the selection), or group them."),
        html.Ul([html.Li(dcc.Link(run_label(info.get(r, {"run_id": r})), href=run_href(r))) for r in rest]),
    ], id="curves-left-out")


def layout(metric: str | None = None, **_kwargs):
    """The page; `/curves?metric=b_simple` opens it on that metric (a link others can follow)."""
    controls = html.Div(
        [
            control("Metric", dcc.Dropdown(id="curves-metric", value=metric if metric in METRICS else "loss",
                                           clearable=False,
                                           options=[{"label": v[0], "value": k} for k, v in METRICS.items()]),
                    extra="control-wide"),
            radio_control("x axis", "curves-x", "step", [{"label": v, "value": k} for k, v in X_LABELS.items()]),
            control("Smoothing (debiased EMA)",
                    dcc.Slider(id="curves-smoothing", min=0, max=0.99, step=0.01, value=0.6,
                               marks={0: "0", 0.5: "0.5", 0.9: "0.9", 0.99: "0.99"},
                               tooltip={"placement": "bottom"}, updatemode="mouseup", allow_direct_input=False),
                    extra="control-slider"),
            control("Axes", dcc.Checklist(id="curves-log", value=["logy"], inline=True, className="radio",
                                          options=[{"label": "log x", "value": "logx"},
                                                   {"label": "log y", "value": "logy"}])),
            radio_control("Colour by", "curves-color", "batch",
                          [{"label": "batch size", "value": "batch"}, {"label": "run", "value": "run"}]),
            *group_controls("curves"),
        ],
        className="controls-bar",
    )
    return html.Div(
        [
            html.Div([html.H1("Curves"),
                      html.P("Training curves of the selected runs. Same colour, same batch size — on every page. "
                             "Click a curve to open its run.", className="lede")], className="page-title"),
            controls,
            html.Div(id="curves-note", className="muted small"),
            export.bar("curves-graph", full=True),
            dcc.Loading(dcc.Graph(id="curves-graph", config=export.graph_config("curves-graph")), type="default",
                        delay_show=400),
        ]
    )


run_click("curves-graph")


@callback(
    Output("curves-graph", "figure"),
    Output("curves-note", "children"),
    Output("curves-group", "options"),
    Input("selected-runs", "data"),
    Input("curves-metric", "value"),
    Input("curves-x", "value"),
    Input("curves-smoothing", "value"),
    Input("curves-log", "value"),
    Input("curves-color", "value"),
    Input("curves-group", "value"),
    Input("curves-stat", "value"),
    Input("curves-band", "value"),
    Input("store-version", "data"),
)
def update_curves(selected, metric, x, smoothing, log, color_by, group_by, stat, band, _version):
    db = queries.current_db()
    if queries.store_version(db) is None:
        return empty_figure("No store yet: see the welcome page."), "", []
    ids = list(selected or [])
    prefix = ""
    if not ids:
        ids, prefix = default_runs(db)
    fig, note = curves_figure(db, ids, metric or "loss", x or "step", float(smoothing or 0),
                              "logx" in (log or []), "logy" in (log or []), color_by or "batch",
                              list(group_by or []), stat or "mean", band or "minmax")
    text = "; ".join(t for t in (prefix, note) if t)
    text = (text[0].upper() + text[1:] + ".") if text else f"{len(ids)} runs."
    options = group_options(queries.run_configs(db, ids[:MAX_RUNS]))
    return fig, [html.Span(text), left_out(db, ids)], options
