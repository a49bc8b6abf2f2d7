"""Curves: loss, accuracy, learning rate, batch size or B_simple over steps, examples or wall time.

Long runs are downsampled in DuckDB (queries.step_curves: equal-width step buckets, at most a few
thousand points per figure); the smoothing is a debiased EMA over steps, applied to the bucket means
with each bucket weighted by the number of steps it holds, so the slider means the same thing at any
zoom or run length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from dash import Input, Output, callback, dcc, html

from dashboard import queries
from dashboard.components import register_page, run_hover, run_label
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
X_LABELS = {"step": "step", "examples": "examples seen", "wall_time": "wall time (s)"}
MAX_RUNS = 60
POINT_BUDGET = 12_000  # points per figure (before the faint raw copy)
QUALITATIVE = ["#3b5bdb", "#e8590c", "#2f9e44", "#d6336c", "#7048e8", "#1098ad", "#f08c00", "#5c940d",
               "#c2255c", "#4263eb", "#0ca678", "#ae3ec9"]


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
    return table.head(MAX_RUNS)["run_id"].to_list(), why


@queries.in_session
def curves_figure(db: Path, run_ids: Sequence[str], metric: str = "loss", x: str = "step",
                  smoothing: float = 0.6, log_x: bool = False, log_y: bool = False,
                  color_by: str = "batch") -> tuple[dict, str]:
    """The curves figure and a one-line note (what is shown, what was left out)."""
    if metric not in METRICS or x not in X_LABELS:
        return empty_figure(f"Unknown metric {metric!r} or x axis {x!r}."), ""
    if not run_ids:
        return empty_figure("No runs to show: select runs on the Runs page."), ""
    ids = list(run_ids)[:MAX_RUNS]
    notes = []
    if len(run_ids) > MAX_RUNS:
        notes.append(f"showing {MAX_RUNS} of {len(run_ids)} selected runs")
    info = {r["run_id"]: r for r in queries.runs_frame(db, ids).to_dicts()}
    label, source = METRICS[metric]
    traces: list[dict] = []
    seen_batches: set = set()
    order = sorted(ids, key=lambda i: (info.get(i, {}).get("batch_size") or 0, info.get(i, {}).get("lr") or 0))
    if source == "noise":
        # the one offline definition (SQL noise_scale), exactly as the Noise scale page draws it: no re-smoothing
        per_run = max(100, POINT_BUDGET // max(1, len(ids)))
        ns = queries.noise_scale(db, ids, max_rows=per_run)
        xcol = x if x in ns.columns else "step"
        if xcol != x:
            notes.append("B_simple is drawn against step (no wall time per measured step)")
        notes.append("B_simple: ratio of the sums of tr(Σ) and |G|² over measured steps within ×1.1 of each step")
        data = ns.select("run_id", pl.col(xcol).cast(pl.Float64).alias("x"), pl.col("b_simple").alias("y"))
        data = data.with_columns(pl.when(pl.col("y") > 0).then(pl.col("y")).alias("y"))  # clamp only for drawing
        for part, row, color, legend in _per_run(data, order, info, color_by, seen_batches):
            traces.append({
                "type": "scatter", "x": arr(part["x"]), "y": arr(part["y"]), "mode": "lines",
                "line": {"color": color, "width": 1.8}, "name": legend["name"],
                "legendgroup": legend["legendgroup"], "showlegend": legend["showlegend"],
                "hovertemplate": f"{run_hover(row)}<br>{X_LABELS[xcol]} %{{x:,.4~g}}<br>{label} %{{y:.4~g}}<extra></extra>",
            })
    elif source == "step":
        per_run = max(100, POINT_BUDGET // max(1, len(ids)))
        data = queries.step_curves(db, ids, STEP_COLUMN.get(metric, metric), x, per_run)
        if data.height and int(data["n"].max()) > 1:
            notes.append(f"long runs averaged into ≤{per_run:,} points each (in DuckDB)")
        smooth = smoothing if metric in ("loss", "b_simple_online") else 0.0
        for part, row, color, legend in _per_run(data, order, info, color_by, seen_batches):
            xs = part["x"].to_numpy()
            ys = part["y"].to_numpy()
            if smooth > 0:
                traces.append({"type": "scatter", "x": arr(xs), "y": arr(ys), "mode": "lines",
                               "line": {"color": color, "width": 1}, "opacity": 0.22, "hoverinfo": "skip",
                               "showlegend": False, "legendgroup": legend["legendgroup"]})
                ys = debiased_ema(ys, smooth, part["n"].to_numpy())
            traces.append({
                "type": "scatter", "x": arr(xs), "y": arr(ys), "mode": "lines",
                "line": {"color": color, "width": 1.8}, "name": legend["name"],
                "legendgroup": legend["legendgroup"], "showlegend": legend["showlegend"],
                "hovertemplate": f"{run_hover(row)}<br>{X_LABELS[x]} %{{x:,.4~g}}<br>{label} %{{y:.4~g}}<extra></extra>",
            })
            if row.get("diverged"):
                traces.append({"type": "scatter", "x": [float(xs[-1])], "y": [float(ys[-1])], "mode": "markers",
                               "marker": {"symbol": "x", "size": 11, "color": DANGER}, "showlegend": False,
                               "hovertemplate": f"{run_label(row)} diverged here<extra></extra>"})
    else:
        split = "test" if metric.startswith("test") else "train"
        what = "accuracy" if metric.endswith("accuracy") else "loss"
        data = queries.eval_curves(db, ids, what, x, (split,))
        for part, row, color, legend in _per_run(data, order, info, color_by, seen_batches):
            traces.append({
                "type": "scatter", "x": arr(part["x"]), "y": arr(part["y"]), "mode": "lines+markers",
                "line": {"color": color, "width": 1.8}, "marker": {"size": 4}, "name": legend["name"],
                "legendgroup": legend["legendgroup"], "showlegend": legend["showlegend"],
                "hovertemplate": f"{run_hover(row)}<br>{X_LABELS[x]} %{{x:,.4~g}}<br>{label} %{{y:.4~g}}<extra></extra>",
            })
    if not traces:
        return empty_figure(f"The chosen runs have no {label} logged."), "; ".join(notes)
    fig = figure(
        traces, height=560, hovermode="closest", uirevision=f"{metric}-{x}",
        xaxis={"title": {"text": X_LABELS[x]}, "type": "log" if log_x else "linear"},
        yaxis={"title": {"text": label}, "type": "log" if log_y else "linear"},
    )
    fig["layout"]["legend"]["title"] = {"text": "batch size" if color_by == "batch" else "run"}
    return fig, "; ".join(notes)


def _per_run(data: pl.DataFrame, order: list[str], info: dict, color_by: str, seen_batches: set):
    """(rows, run info, colour, legend entry) per run with data, in the page's run order."""
    parts = data.partition_by("run_id", as_dict=True) if data.height else {}
    parts = {k[0] if isinstance(k, tuple) else k: v for k, v in parts.items()}
    for k, rid in enumerate(order):
        part = parts.get(rid)
        if part is None or part.is_empty():
            continue
        row = info.get(rid, {"run_id": rid})
        color = batch_color(row.get("batch_size")) if color_by == "batch" else QUALITATIVE[k % len(QUALITATIVE)]
        yield part, row, color, _legend(row, color_by, seen_batches)


def _legend(row: dict, color_by: str, seen: set) -> dict:
    if color_by == "batch":
        b = row.get("batch_size")
        first = b not in seen
        seen.add(b)
        return {"name": f"B={b}", "legendgroup": f"B{b}", "showlegend": first}
    return {"name": run_label(row), "legendgroup": row["run_id"], "showlegend": True}


def layout(metric: str | None = None, **_kwargs):
    """The page; `/curves?metric=b_simple` opens it on that metric (a link others can follow)."""
    controls = html.Div(
        [
            html.Div([html.Label("Metric", className="control-label"),
                      dcc.Dropdown(id="curves-metric", value=metric if metric in METRICS else "loss", clearable=False,
                                   options=[{"label": v[0], "value": k} for k, v in METRICS.items()])],
                     className="control control-wide"),
            html.Div([html.Label("x axis", className="control-label"),
                      dcc.RadioItems(id="curves-x", value="step", inline=True, className="radio",
                                     options=[{"label": v, "value": k} for k, v in X_LABELS.items()])],
                     className="control"),
            html.Div([html.Label("Smoothing (debiased EMA)", className="control-label"),
                      dcc.Slider(id="curves-smoothing", min=0, max=0.99, step=0.01, value=0.6,
                                 marks={0: "0", 0.5: "0.5", 0.9: "0.9", 0.99: "0.99"},
                                 tooltip={"placement": "bottom"}, updatemode="mouseup",
                                 allow_direct_input=False)],
                     className="control control-slider"),
            html.Div([html.Label("Axes", className="control-label"),
                      dcc.Checklist(id="curves-log", value=["logy"], inline=True, className="radio",
                                    options=[{"label": "log x", "value": "logx"},
                                             {"label": "log y", "value": "logy"}])],
                     className="control"),
            html.Div([html.Label("Colour by", className="control-label"),
                      dcc.RadioItems(id="curves-color", value="batch", inline=True, className="radio",
                                     options=[{"label": "batch size", "value": "batch"},
                                              {"label": "run", "value": "run"}])],
                     className="control"),
        ],
        className="controls-bar",
    )
    return html.Div(
        [
            html.Div([html.H1("Curves"),
                      html.P("Training curves of the selected runs. Same colour, same batch size — on every page.",
                             className="lede")], className="page-title"),
            controls,
            html.Div(id="curves-note", className="muted small"),
            dcc.Loading(dcc.Graph(id="curves-graph", config={"displaylogo": False}), type="default",
                        delay_show=400),
        ]
    )


@callback(
    Output("curves-graph", "figure"),
    Output("curves-note", "children"),
    Input("selected-runs", "data"),
    Input("curves-metric", "value"),
    Input("curves-x", "value"),
    Input("curves-smoothing", "value"),
    Input("curves-log", "value"),
    Input("curves-color", "value"),
    Input("store-version", "data"),
)
def update_curves(selected, metric, x, smoothing, log, color_by, _version):
    db = queries.current_db()
    if queries.store_version(db) is None:
        return empty_figure("No store yet: see the welcome page."), ""
    ids = list(selected or [])
    prefix = ""
    if not ids:
        ids, prefix = default_runs(db)
    fig, note = curves_figure(db, ids, metric or "loss", x or "step", float(smoothing or 0),
                              "logx" in (log or []), "logy" in (log or []), color_by or "batch")
    text = "; ".join(t for t in (prefix, note) if t)
    return fig, (text[0].upper() + text[1:] + ".") if text else f"{len(ids)} runs."

