"""Export from any plot: PNG and SVG through Plotly's own image export, a CSV of exactly the data drawn,
and a CSV of the stored rows behind it ("full resolution", not the downsampled points).

Use, for a dcc.Graph with id "my-graph" (one line in the page's layout, next to the graph):

    export.bar("my-graph")                          # PNG, SVG, CSV of the drawn points
    export.bar("my-graph", full=True)               # + "CSV, full resolution" (figure built with export.spec)

and pass `config=export.graph_config("my-graph")` to the dcc.Graph so the toolbar's camera saves the same
file name at twice the screen resolution. Full resolution needs the figure to say where its rows come
from: `fig["layout"]["meta"] = export.spec("steps", run_ids=[...], columns=["loss"])` (kinds: FULL_KINDS).

Why the drawn CSV is built from the browser's own copy of the figure (Plotly's _fullData): that is what
is on the screen (hidden traces left out), whatever the page did to the data before drawing it. The
callbacks are pattern-matched, registered once here, so a page only adds the bar.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import dash
import polars as pl
from dash import MATCH, Input, Output, State, dcc, html

from dashboard import queries


def graph_config(graph_id: str, **extra) -> dict:
    """dcc.Graph config: no Plotly logo; the toolbar's camera saves PNG at 2x, named after the graph."""
    return {"displaylogo": False,
            "toImageButtonOptions": {"format": "png", "filename": _stem(graph_id), "scale": 2}, **extra}


def bar(graph_id: str, full: bool = False) -> html.Div:
    """The export buttons for one graph (see the module docstring)."""
    def button(what: str, label: str, title: str) -> html.Button:
        return html.Button(label, id={"type": f"plot-export-{what}", "graph": graph_id}, n_clicks=0,
                           className="plot-export-button", title=title, type="button")

    buttons = [button("png", "PNG", "Save the plot as a PNG image (Plotly's export)"),
               button("svg", "SVG", "Save the plot as an SVG vector image (Plotly's export)"),
               button("csv", "CSV", "The points drawn, one row per point (hidden traces left out)")]
    full_button = button("full", "CSV, full resolution", "Every stored row behind the plot, not the downsampled points")
    if not full:  # kept (hidden) so the pattern-matched callback always finds its two inputs
        full_button.hidden = True
    buttons.append(full_button)
    return html.Div(
        [html.Span("Export", className="plot-export-label"), *buttons,
         dcc.Download(id={"type": "plot-export-download", "graph": graph_id}),
         dcc.Store(id={"type": "plot-export-request", "graph": graph_id})],
        className="plot-export", id={"type": "plot-export-bar", "graph": graph_id},
    )


def spec(kind: str, **params) -> dict:
    """Layout meta saying where a figure's full-resolution rows come from (kind in FULL_KINDS)."""
    if kind not in FULL_KINDS:
        raise ValueError(f"unknown export kind {kind!r}")
    return {"export": {"kind": kind, **params}}


# ---------------------------------------------------------------------------------------------------
# pure: the drawn data as rows


def drawn_frame(traces: list[dict], x_title: str | None = None, y_title: str | None = None) -> pl.DataFrame:
    """One row per drawn point: series (trace name), run_id (trace meta), x, y (and z for heatmaps).

    `traces` are Plotly traces as the browser holds them (x, y, z, name, meta, visible); points without a
    y value (gaps) are not drawn and not written. Columns are named after the axis titles."""
    xs, ys, series, runs, zs = [], [], [], [], []
    for k, t in enumerate(traces):
        if t.get("visible") in (False, "legendonly"):
            continue
        name = t.get("name") or f"trace {k}"
        meta = t.get("meta") if isinstance(t.get("meta"), dict) else {}
        rid = meta.get("run_id") or ";".join(meta.get("members") or []) or None
        x, y, z = list(t.get("x") or []), list(t.get("y") or []), t.get("z")
        if z is not None:  # heatmap: a value per (x, y) cell
            for j, row in enumerate(z):
                for i, v in enumerate(row or []):
                    if v is None or i >= len(x) or j >= len(y):
                        continue
                    xs.append(x[i]), ys.append(y[j]), zs.append(_num(v)), series.append(name), runs.append(rid)
            continue
        if not x:
            x = list(range(len(y)))
        for xv, yv in zip(x, y, strict=False):
            if yv is None or xv is None:
                continue
            xs.append(xv), ys.append(yv), series.append(name), runs.append(rid)
    xname, yname = _column(x_title, "x"), _column(y_title, "y")
    if yname == xname:
        yname = f"{yname} (y)"
    cols = {"series": pl.Series(series, dtype=pl.String), "run_id": pl.Series(runs, dtype=pl.String),
            xname: _column_values(xs), yname: _column_values(ys)}
    if zs:
        cols["value"] = pl.Series(zs, dtype=pl.Float64)
    return pl.DataFrame(cols)


def to_csv(frame: pl.DataFrame) -> str:
    """Plain CSV: numbers unquoted, no byte-order mark, full float precision."""
    return frame.write_csv()


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _column_values(values: list) -> pl.Series:
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return pl.Series([float(v) for v in values], dtype=pl.Float64)
    return pl.Series([str(v) for v in values], dtype=pl.String)


def _column(title, default: str) -> str:
    text = title.get("text") if isinstance(title, dict) else title
    text = re.sub(r"<[^>]+>", "", str(text or "")).strip()
    return text or default


def _stem(graph_id: str) -> str:
    return "batchscope-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", graph_id.removesuffix("-graph"))


# ---------------------------------------------------------------------------------------------------
# full resolution: the stored rows, per kind of figure (queries.py, pages-a block)


def _ids(params: dict) -> list[str]:
    return [str(r) for r in (params.get("run_ids") or [])][:5000]


FULL_KINDS: dict[str, Callable[[Path, dict], pl.DataFrame]] = {
    "steps": lambda db, p: queries.full_steps(db, _ids(p), p.get("columns") or ["loss"]),
    "evals": lambda db, p: queries.evals_frame(db, _ids(p)),
    "noise_scale": lambda db, p: queries.noise_scale_full(db, _ids(p), float(p.get("noise_window", 0.1))),
    "scalars": lambda db, p: queries.full_scalars(db, _ids(p), [str(n) for n in p.get("names") or []]),
}


def full_frame(db: Path, meta: dict | None) -> pl.DataFrame | None:
    """The stored rows behind a figure whose layout meta came from `spec`; None when it says nothing."""
    ex = (meta or {}).get("export") if isinstance(meta, dict) else None
    if not isinstance(ex, dict) or ex.get("kind") not in FULL_KINDS:
        return None
    return FULL_KINDS[ex["kind"]](db, ex)


# ---------------------------------------------------------------------------------------------------
# callbacks (pattern-matched: one set for every bar on every page)

_IMAGE_JS = """
function(n, id) {
    if (!n) { return window.dash_clientside.no_update; }
    var gd = document.getElementById(id.graph);
    gd = gd && (gd.classList.contains('js-plotly-plot') ? gd : gd.querySelector('.js-plotly-plot'));
    if (!gd || !window.Plotly) { return window.dash_clientside.no_update; }
    var opts = (gd._context && gd._context.toImageButtonOptions) || {};
    window.Plotly.downloadImage(gd, {format: '%s', filename: opts.filename || id.graph,
                                     scale: '%s' === 'png' ? 2 : 1});
    return window.dash_clientside.no_update;
}
"""

# what the browser draws: _fullData (typed arrays as plain lists), hidden traces kept but marked
_REQUEST_JS = """
function(n_csv, n_full, id) {
    var ctx = window.dash_clientside.callback_context;
    var trig = (ctx.triggered && ctx.triggered.length) ? ctx.triggered[0].prop_id : '';
    if (!trig || (!n_csv && !n_full)) { return window.dash_clientside.no_update; }
    var gd = document.getElementById(id.graph);
    gd = gd && (gd.classList.contains('js-plotly-plot') ? gd : gd.querySelector('.js-plotly-plot'));
    if (!gd || !gd._fullData) { return window.dash_clientside.no_update; }
    var list = function (a) { return a ? Array.from(a, function (v) { return v && v.length !== undefined
        && typeof v !== 'string' ? Array.from(v) : v; }) : null; };
    var traces = gd._fullData.map(function (t) {
        return {name: t.name, meta: t.meta, visible: t.visible, x: list(t.x), y: list(t.y),
                z: t.z ? list(t.z) : null};
    });
    var lay = gd.layout || {};
    return {what: trig.indexOf('plot-export-full') >= 0 ? 'full' : 'drawn', t: Date.now(), traces: traces,
            x_title: lay.xaxis && lay.xaxis.title, y_title: lay.yaxis && lay.yaxis.title, meta: lay.meta || null,
            filename: (gd._context && gd._context.toImageButtonOptions || {}).filename || id.graph};
}
"""

for _fmt in ("png", "svg"):
    dash.clientside_callback(
        _IMAGE_JS % (_fmt, _fmt),
        Output({"type": f"plot-export-{_fmt}", "graph": MATCH}, "title"),
        Input({"type": f"plot-export-{_fmt}", "graph": MATCH}, "n_clicks"),
        State({"type": "plot-export-bar", "graph": MATCH}, "id"),
        prevent_initial_call=True,
    )

dash.clientside_callback(
    _REQUEST_JS,
    Output({"type": "plot-export-request", "graph": MATCH}, "data"),
    Input({"type": "plot-export-csv", "graph": MATCH}, "n_clicks"),
    Input({"type": "plot-export-full", "graph": MATCH}, "n_clicks"),
    State({"type": "plot-export-bar", "graph": MATCH}, "id"),
    prevent_initial_call=True,
)


@dash.callback(
    Output({"type": "plot-export-download", "graph": MATCH}, "data"),
    Input({"type": "plot-export-request", "graph": MATCH}, "data"),
    prevent_initial_call=True,
)
def _download(request):
    if not isinstance(request, dict) or not isinstance(request.get("traces"), list):
        return dash.no_update
    stem = _stem(str(request.get("filename") or "plot").removeprefix("batchscope-"))
    if request.get("what") == "full":
        frame = full_frame(queries.current_db(), request.get("meta"))
        if frame is not None:
            return {"content": to_csv(frame), "filename": f"{stem}-full.csv", "type": "text/csv"}
    frame = drawn_frame(request["traces"], request.get("x_title"), request.get("y_title"))
    return {"content": to_csv(frame), "filename": f"{stem}.csv", "type": "text/csv"}
