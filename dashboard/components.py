"""Pieces shared by the pages: which runs a page looks at (its scope), page headers, run labels."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import dash
import polars as pl
from dash import dcc, html
from dash.exceptions import PageError

from dashboard import queries

PAGES: dict[str, dict] = {}


def register_page(module: str, **kwargs) -> None:
    """dash.register_page, also when a page module is imported before the app exists (tests, bench,
    notebooks): then create_app registers it."""
    PAGES[module] = kwargs
    with contextlib.suppress(PageError):
        dash.register_page(module, **kwargs)


SELECTED = "__selected__"
ALL = "__all__"


def page_header(title: str, lede: str, controls=None) -> html.Div:
    return html.Div(
        [html.Div([html.H1(title), html.P(lede, className="lede")], className="page-title"),
         html.Div(controls or [], className="page-controls")],
        className="page-header",
    )


def page_layout(prefix: str, title: str, lede: str, controls: list, body: list, above: Sequence = ()) -> html.Div:
    """An analysis page: its header with the controls, the slot `{prefix}-problem` for store_problem's message,
    `above` (shown while the page computes), then `body` under one loading spinner."""
    return html.Div(
        [page_header(title, lede, controls), html.Div(id=f"{prefix}-problem"), *above,
         dcc.Loading(body, type="default", delay_show=500)]
    )


def control(label: str, child, *, extra: str = "", html_for: str | None = None) -> html.Div:
    """A labelled control of a page's header bar (`extra`: more classes, e.g. "control-wide")."""
    tag = html.Label(label, htmlFor=html_for, className="control-label") if html_for \
        else html.Label(label, className="control-label")
    return html.Div([tag, child], className=f"control {extra}" if extra else "control")


def radio_control(label: str, id: str, value, options: list[dict]) -> html.Div:
    """A labelled row of radio buttons, the pages' one look for a small choice."""
    return control(label, dcc.RadioItems(id=id, value=value, inline=True, className="radio", options=options))


def scope_dropdown(id: str) -> html.Div:
    return control("Runs", dcc.Dropdown(id=id, clearable=False, searchable=False, className="scope-dropdown"),
                   html_for=id)


def scope_callback(dropdown_id: str) -> None:
    """Register the callback that fills a page's scope dropdown from the selection and the store."""

    @dash.callback(
        dash.Output(dropdown_id, "options"),
        dash.Output(dropdown_id, "value"),
        dash.Input("selected-runs", "data"),
        dash.Input("store-version", "data"),
        dash.State(dropdown_id, "value"),
    )
    def fill_scope(selected, _version, current):
        return scope_options(queries.current_db(), selected, current)


def scope_options(db: Path, selected: Sequence[str] | None, current: str | None = None) -> tuple[list[dict], str | None]:
    """Dropdown options (selected runs, each sweep, all runs) and the value to show.

    The default follows the Runs page: the selected runs if any, else the most recent sweep."""
    ov = queries.overview(db)
    opts: list[dict] = []
    if selected:
        opts.append({"label": f"Selected runs ({len(selected)})", "value": SELECTED})
    for sw in ov.sweeps:
        opts.append({"label": f"Sweep: {sw}", "value": sw})
    opts.append({"label": f"All runs ({ov.runs:,})", "value": ALL})
    values = {o["value"] for o in opts}
    if current in values:
        value = current
    elif selected:
        value = SELECTED
    elif ov.sweeps:
        value = ov.sweeps[0]
    else:
        value = ALL
    return opts, value


def page_scope(scope: str | None, selected: Sequence[str] | None) -> tuple[Path, list[str], str, html.Div | None]:
    """What a page's callback starts from: (store, run ids of its scope, the scope's label, None), or, when the
    store is missing, empty or unreadable, (store, [], "", the message to show in place of the page)."""
    db = queries.current_db()
    problem = store_problem(db)
    if problem is not None:
        return db, [], "", problem
    runs, label = resolve_scope(db, scope, selected)
    return db, runs["run_id"].to_list(), label, None


def resolve_scope(db: Path, scope: str | None, selected: Sequence[str] | None) -> tuple[pl.DataFrame, str]:
    """(run_summary rows, label) for a scope value."""
    table = queries.run_table(db)
    if scope == SELECTED and selected:
        runs = table.filter(pl.col("run_id").is_in(list(selected)))
        return runs, f"{runs.height} selected runs"
    if scope and scope not in (SELECTED, ALL):
        return table.filter(pl.col("sweep") == scope), f"sweep {scope}"
    return table, "all runs"


def run_label(row: dict) -> str:
    return row.get("name") or row.get("run_id") or "?"


def run_hover(row: dict) -> str:
    """Run details for a hover box (HTML, plotly's subset)."""
    from dashboard.theme import fmt

    bits = [f"<b>{run_label(row)}</b>"]
    if row.get("sweep"):
        bits.append(f"sweep {row['sweep']}")
    bits.append(f"B={row.get('batch_size')}  lr={fmt(row.get('lr'))}  {row.get('optimizer') or ''}")
    bits.append(f"status {row.get('status')}  seed {row.get('seed')}")
    return "<br>".join(bits)


def store_problem(db: Path) -> html.Div | None:
    """A message in place of a page when the store is missing, empty or unreadable."""
    ov = queries.overview(db)
    if ov.error:
        return html.Div([html.H3("The store cannot be read"), html.Pre(ov.error)], className="note note-warn")
    if not ov.exists or ov.empty:
        return html.Div(
            ["No runs yet. ", dcc.Link("Open the welcome page", href="/welcome"),
             " to train a first run or load the sample sweep."],
            className="note note-info",
        )
    return None


# --- pages-a ---


def run_href(run_id: str) -> str:
    """The run page's URL for a run (`/run/<run_id>`), quoted so any run id makes a valid link."""
    from urllib.parse import quote

    return f"/run/{quote(str(run_id), safe='')}"


def group_controls(prefix: str) -> list[html.Div]:
    """Group-by (config keys; seed replicas first), statistic and band controls for a page's plots: ids
    `{prefix}-group` (options filled by the page), `{prefix}-stat`, `{prefix}-band`."""
    from dashboard.grouping import REPLICAS

    return [
        control("Group by", dcc.Dropdown(id=f"{prefix}-group", multi=True, value=[], placeholder="no grouping",
                                         options=[{"label": "seed replicas (all but seed)", "value": REPLICAS}],
                                         className="group-dropdown"),
                extra="control-wide", html_for=f"{prefix}-group"),
        radio_control("Group line", f"{prefix}-stat", "mean",
                      [{"label": "mean", "value": "mean"}, {"label": "median", "value": "median"}]),
        radio_control("Band", f"{prefix}-band", "minmax",
                      [{"label": "min–max", "value": "minmax"}, {"label": "95 % CI", "value": "ci95"},
                       {"label": "±1 sd", "value": "std"}, {"label": "none", "value": "none"}]),
    ]


def group_options(configs: dict[str, dict]) -> list[dict]:
    """Group-by choices for these runs: seed replicas, then every config key whose value differs between them."""
    from dashboard.grouping import REPLICAS, run_config, varying_keys

    keys = varying_keys([run_config(c) for c in configs.values()])
    return [{"label": "seed replicas (all but seed)", "value": REPLICAS}] + [{"label": k, "value": k} for k in keys]


_RUN_CLICK_JS = """
function(click) {
    var p = click && click.points && click.points[0];
    if (!p) { return window.dash_clientside.no_update; }
    var gd = document.getElementById('%s');
    gd = gd && (gd.classList.contains('js-plotly-plot') ? gd : gd.querySelector('.js-plotly-plot'));
    var t = gd && gd.data && gd.data[p.curveNumber];
    var rid = t && t.meta && t.meta.run_id;
    if (rid) { window.location.assign('/run/' + encodeURIComponent(rid)); }
    return window.dash_clientside.no_update;
}
"""


def run_click(graph_id: str) -> None:
    """Clicking a trace whose `meta` names a run (meta={"run_id": ...}) opens that run's page (run_href).
    Call once at import, beside the page's callbacks."""
    dash.clientside_callback(_RUN_CLICK_JS % graph_id, dash.Output(graph_id, "className"),
                             dash.Input(graph_id, "clickData"), prevent_initial_call=True)


QUALITATIVE = ["#3b5bdb", "#e8590c", "#2f9e44", "#d6336c", "#7048e8", "#1098ad", "#f08c00", "#5c940d",
               "#c2255c", "#4263eb", "#0ca678", "#ae3ec9"]
CLICK = "<br><i>click: open the run page</i>"


def grouped_traces(db: Path, curves: dict, info: dict, group_by: Sequence[str], stat: str, band_kind: str,
                   color_by: str, xl: str, label: str, notes: list[str]) -> list[dict]:
    """Grouped plot traces from per-run curves {run_id: (x, raw y, drawn y)}: members drawn faint (each
    clickable: meta run_id), then each group's band and centre line (dashboard.grouping); notes say how."""
    from dashboard import grouping
    from dashboard.theme import arr, batch_color

    configs = {rid: grouping.run_config(c) for rid, c in queries.run_configs(db, list(curves)).items()}
    traces, bands = [], []
    for k, (name, members) in enumerate(grouping.group_runs({r: configs.get(r, {}) for r in curves}, group_by)):
        batches = {info.get(r, {}).get("batch_size") for r in members}
        color = batch_color(next(iter(batches))) if color_by == "batch" and len(batches) == 1 \
            else QUALITATIVE[k % len(QUALITATIVE)]
        for rid in members:
            row = info.get(rid, {"run_id": rid})
            xs, _raw, ys = curves[rid]
            traces.append({"type": "scatter", "x": arr(xs), "y": arr(ys), "mode": "lines",
                           "name": f"{run_label(row)} (seed {row.get('seed')})",
                           "line": {"color": color, "width": 0.8}, "opacity": 0.35, "showlegend": False,
                           "legendgroup": f"g{k}", "meta": {"run_id": rid},
                           "hovertemplate": f"{run_hover(row)}<br>{label} %{{y:.4~g}}{CLICK}<extra></extra>"})
        b = grouping.aggregate([(curves[r][0], curves[r][2]) for r in members], stat, band_kind)
        if b is None:
            notes.append(f"group {name}: its runs do not overlap in {xl}, only its members are drawn")
            continue
        if b.note:
            notes.append(f"group {name}: {b.note}")
        bands.append(b)
        traces += grouping.band_traces(b, name, color, members, stat, band_kind, xl, label, f"g{k}")
    notes.insert(0, grouping.alignment_note(bands, xl, stat, band_kind))
    return traces


# --- pages-b ---


def graph_panel(graph_id: str, full: bool = False) -> html.Div:
    """A plot in a panel with its export bar (PNG, SVG, CSV of the drawn points; `full`: also the stored
    rows, for figures whose layout meta comes from export.spec)."""
    from dashboard import export

    return html.Div([export.bar(graph_id, full=full), dcc.Graph(id=graph_id, config=export.graph_config(graph_id))],
                    className="panel")
