"""Colours, figure template and small layout helpers shared by every page.

One batch size has one colour on every page: a fixed function of log2(B) over B = 1 ... 8192. Each
power of two has its own anchor colour, chosen so that neighbouring batch sizes differ clearly
(CIELAB distance > 25 between consecutive powers of two; a sequential scale such as Viridis gives
under 10 at its dark end, where 8, 16 and 32 looked alike) while the hue still walks in order from
deep purple (small) through blue, green and yellow to orange, red, violet and brown (large); batch sizes between two
powers of two are interpolated. Every anchor is dark enough to read as a line on white.
"""

from __future__ import annotations

import functools
import math

from dash import html

FONT = "Inter, system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
INK = "#1f2430"
MUTED = "#6b7280"
GRID = "#e9ecf2"
ACCENT = "#3b5bdb"
DANGER = "#d6336c"
OK = "#2f9e44"
WARN = "#e8590c"

STATUS_COLORS = {"running": ACCENT, "finished": OK, "diverged": DANGER, "failed": "#c92a2a", "stale": WARN}

# B = 1, 2, 4, ..., 8192 (tests/test_dashboard_layout.py checks the distances)
BATCH_ANCHORS = ("#2d0b59", "#9c36b5", "#4c6ef5", "#1864ab", "#15aabf", "#099268", "#66a80f", "#c99700",
                 "#f76707", "#c92a2a", "#a61e4d", "#862e9c", "#5c3a21", "#343a40")


def batch_color(batch: float | None) -> str:
    """The colour of batch size `batch` (the same on every page)."""
    try:
        return _batch_color(None if batch is None else float(batch))
    except (TypeError, ValueError):
        return MUTED


def _rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


@functools.lru_cache(maxsize=4096)
def _batch_color(batch: float | None) -> str:
    if batch is None or not (batch > 0) or math.isnan(batch):
        return MUTED
    pos = min(max(math.log2(batch), 0.0), len(BATCH_ANCHORS) - 1.0)
    i = min(int(pos), len(BATCH_ANCHORS) - 2)
    f = pos - i
    a, b = _rgb(BATCH_ANCHORS[i]), _rgb(BATCH_ANCHORS[i + 1])
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))


def batch_colorscale(batches) -> list[list]:
    """A continuous colourscale covering `batches` with the same colours as batch_color (for heatmaps)."""
    lo, hi = math.log2(min(batches)), math.log2(max(batches))
    if hi <= lo:
        c = batch_color(min(batches))
        return [[0, c], [1, c]]
    return [[i / 10, batch_color(2 ** (lo + (hi - lo) * i / 10))] for i in range(11)]


TITLE_PAD = 32  # px from the figure's top to its title: below the modebar


# Figures are plain dicts ({"data": [...], "layout": {...}}), which dcc.Graph takes as they are:
# building plotly.graph_objects validates every property and costs more than the queries behind a page.
_AXIS = {"gridcolor": GRID, "zeroline": False, "linecolor": "#cfd4dc", "ticks": "outside", "tickcolor": "#cfd4dc",
         "automargin": True, "title": {"standoff": 8}}


def figure(data: list[dict], title: str | None = None, height: int = 460, xaxis: dict | None = None,
           yaxis: dict | None = None, **layout) -> dict:
    """A figure dict with the house style; traces are dicts (e.g. {"type": "scatter", "x": ..., ...})."""
    lay = {
        "font": {"family": FONT, "size": 13, "color": INK},
        "height": height,
        "margin": {"l": 64, "r": 24, "t": 24, "b": 56},
        "hoverlabel": {"font": {"family": FONT, "size": 12}},
        "legend": {"font": {"size": 12}, "bgcolor": "rgba(255,255,255,0.8)"},
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "colorway": ["#3b5bdb", "#e8590c", "#2f9e44", "#d6336c", "#7048e8", "#1098ad", "#f08c00"],
        "xaxis": {**_AXIS, **(xaxis or {})},
        "yaxis": {**_AXIS, **(yaxis or {})},
        "template": {},
    }
    if title:
        # on its own line under Plotly's toolbar (the modebar sits in the top ~30 px, right-aligned)
        lay["title"] = {"text": title, "x": 0.01, "xanchor": "left", "xref": "paper", "y": 1, "yref": "container",
                        "yanchor": "top", "pad": {"t": TITLE_PAD}, "font": {"size": 15}}
        lay["margin"]["t"] = TITLE_PAD + 40
    if "legend" in layout:
        layout = {**layout, "legend": {**lay["legend"], **layout["legend"]}}
    lay.update(layout)
    if lay.get("legend", {}).get("orientation") == "h":  # a legend under the plot needs room below the axis title
        lay["margin"]["b"] = 110
        lay["legend"] = {**lay["legend"], "y": -0.22, "yanchor": "top", "x": 0, "xanchor": "left"}
    return {"data": data, "layout": lay}


def vline(x: float, color: str, text: str | None = None, dash: str = "dash", log: bool = False) -> tuple[dict, dict | None]:
    """A vertical line across the plot (shape) and its label (annotation); `log`: the x axis is logarithmic
    (plotly.js takes shapes in data units but annotations in log10 units there)."""
    shape = {"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
             "line": {"color": color, "dash": dash, "width": 1.5}}
    ann = {"x": math.log10(x) if log else x, "xref": "x", "y": 1, "yref": "paper", "text": text, "showarrow": False, "xanchor": "left",
           "yanchor": "bottom", "font": {"size": 11, "color": color}} if text else None
    return shape, ann


def hline(y: float, color: str, text: str | None = None, dash: str = "dot", log: bool = False) -> tuple[dict, dict | None]:
    shape = {"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": y, "y1": y,
             "line": {"color": color, "dash": dash, "width": 1.5}}
    ann = {"x": 1, "xref": "paper", "y": math.log10(y) if log else y, "yref": "y", "text": text, "showarrow": False, "xanchor": "right",
           "yanchor": "bottom", "font": {"size": 11, "color": color}} if text else None
    return shape, ann


def empty_figure(message: str, height: int = 360) -> dict:
    """A blank figure that says why there is nothing to draw (instead of a wrong or empty plot)."""
    return {"data": [], "layout": {
        "height": height, "margin": {"l": 20, "r": 20, "t": 20, "b": 20}, "template": {},
        "plot_bgcolor": "white", "paper_bgcolor": "white",
        "xaxis": {"visible": False}, "yaxis": {"visible": False},
        "annotations": [{"text": message, "showarrow": False, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper",
                         "font": {"size": 14, "color": MUTED, "family": FONT}}] if message else [],
    }}


def arr(x) -> list:
    """A column as a JSON-able list (NaN/inf -> None, which plotly draws as a gap)."""
    import numpy as np

    a = np.asarray(x.to_numpy() if hasattr(x, "to_numpy") else x)
    if a.dtype.kind == "f":
        return [None if not math.isfinite(v) else v for v in a.tolist()]
    return a.tolist()


def stat(label: str, value: str, sub: str | None = None, id: str | None = None,
         exact: float | None = None) -> html.Div:
    """A headline number card; `exact` (the unrounded number) goes into the value's tooltip."""
    kw = {"id": id} if id else {}
    if exact is not None and math.isfinite(exact):
        kw["title"] = repr(float(exact))
    return html.Div(
        [html.Div(label, className="stat-label"), html.Div(value, className="stat-value", **kw),
         html.Div(sub or "", className="stat-sub")],
        className="stat",
    )


def note(children, kind: str = "info") -> html.Div:
    return html.Div(children, className=f"note note-{kind}")


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for people: 3 significant digits, thousands separators, '—' for missing."""
    if x is None:
        return "—"
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(xf):
        return "—"
    if math.isinf(xf):
        return "∞" if xf > 0 else "−∞"
    if xf != 0 and (abs(xf) >= 1e6 or abs(xf) < 1e-3):
        return f"{xf:.{digits - 1}e}"
    if abs(xf) >= 1000:
        return f"{xf:,.0f}"
    return f"{xf:.{digits}g}"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 run', '2 runs', '1,000 batch sizes' (`many`: the plural when it is not word + 's')."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
