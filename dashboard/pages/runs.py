"""Runs: every run in a sortable, filterable grid, grouped by sweep; the selection drives every other page."""

from __future__ import annotations

from pathlib import Path

import dash
import dash_ag_grid as dag
import polars as pl
from dash import Input, Output, State, callback, ctx, html

from dashboard import queries
from dashboard.components import page_header, register_page
from dashboard.pages import welcome
from dashboard.theme import STATUS_COLORS, batch_color, fmt

register_page(__name__, path="/", name="Runs", title="batchscope · runs", order=0)

_NUM = {"type": "numericColumn", "filter": "agNumberColumnFilter"}
_FMT3 = {"function": "params.value == null ? '' : d3.format('.3~g')(params.value)"}
_FMT_PCT = {"function": "params.value == null ? '' : d3.format('.1%')(params.value)"}
_FMT_INT = {"function": "params.value == null ? '' : d3.format(',d')(params.value)"}
_FMT_S = {"function": "params.value == null ? '' : d3.format('.3~s')(params.value) + 's'"}

COLUMN_DEFS = [
    {"field": "status", "width": 120, "pinned": "left",
     "cellClass": {"function": "'status-cell status-' + params.value"}},
    {"field": "name", "minWidth": 170, "pinned": "left"},
    {"field": "sweep", "minWidth": 140},
    {"field": "task", "width": 110},
    {"field": "batch_size", "headerName": "batch", "width": 105, **_NUM,
     "cellStyle": {"function": "params.data.batch_color ? {'borderLeft': '4px solid ' + params.data.batch_color} : {}"}},
    {"field": "lr", "headerName": "LR", "width": 100, **_NUM, "valueFormatter": _FMT3},
    {"field": "optimizer", "width": 105},
    {"field": "seed", "width": 85, **_NUM},
    {"field": "steps", "width": 100, **_NUM, "valueFormatter": _FMT_INT},
    {"field": "epochs", "width": 95, **_NUM, "valueFormatter": _FMT3},
    {"field": "best_loss", "headerName": "best train loss", "width": 130, **_NUM, "valueFormatter": _FMT3},
    {"field": "final_test_loss", "headerName": "test loss", "width": 110, **_NUM, "valueFormatter": _FMT3},
    {"field": "best_test_accuracy", "headerName": "best test acc", "width": 130, **_NUM, "valueFormatter": _FMT_PCT},
    {"field": "gap_loss", "headerName": "gap (loss)", "width": 115, **_NUM, "valueFormatter": _FMT3,
     "headerTooltip": "final test loss − final train loss"},
    {"field": "gap_accuracy", "headerName": "gap (acc)", "width": 110, **_NUM, "valueFormatter": _FMT_PCT,
     "headerTooltip": "final train accuracy − final test accuracy"},
    {"field": "wall_time", "headerName": "time", "width": 95, **_NUM, "valueFormatter": _FMT_S},
    {"field": "device", "width": 110},
    {"field": "started_at", "headerName": "started", "minWidth": 170, "filter": "agDateColumnFilter"},
    {"field": "run_id", "width": 130},
]


@queries.in_session
def runs_rows(db: Path) -> list[dict]:
    """The grid's rows: run_summary with a colour per batch size and readable timestamps."""
    table = queries.run_table(db)
    if table.is_empty():
        return []
    table = table.with_columns(
        [pl.col(c).dt.strftime("%Y-%m-%d %H:%M:%S") for c, t in table.schema.items() if t.is_temporal()]
    )
    rows = table.to_dicts()
    for r in rows:
        r["batch_color"] = batch_color(r.get("batch_size"))
        for k, v in list(r.items()):
            if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
                r[k] = None  # JSON has no NaN
    return rows


def sweep_summary(db: Path) -> list[dict]:
    """One line per sweep: how many runs, in which state, and the best loss reached."""
    table = queries.run_table(db)
    if table.is_empty():
        return []
    t = table.with_columns(pl.col("sweep").fill_null("(no sweep)"))
    g = (t.group_by("sweep", maintain_order=True)
         .agg(pl.len().alias("runs"),
              (pl.col("status") == "running").sum().alias("running"),
              pl.col("diverged").fill_null(False).sum().alias("diverged"),
              pl.col("batch_size").n_unique().alias("batches"),
              pl.col("lr").n_unique().alias("lrs"),
              pl.col("best_loss").min().alias("best_loss")))
    return g.to_dicts()


def _sweep_cards(db: Path) -> list:
    cards = []
    for s in sweep_summary(db):
        bits = [f"{s['runs']} runs", f"{s['batches']} batch sizes × {s['lrs']} LRs"]
        if s["running"]:
            bits.append(f"{s['running']} running")
        if s["diverged"]:
            bits.append(f"{s['diverged']} diverged")
        cards.append(html.Div(
            [html.Div(s["sweep"], className="sweep-name"),
             html.Div(" · ".join(bits), className="sweep-meta"),
             html.Div(f"best train loss {fmt(s['best_loss'])}", className="sweep-meta"),
             html.Button("Select sweep", id={"type": "select-sweep", "sweep": s["sweep"]},
                         className="btn btn-small", n_clicks=0)],
            className="sweep-card",
        ))
    return cards


def layout(**_kwargs):
    db = queries.current_db()
    ov = queries.overview(db)
    if ov.error:
        return html.Div([html.H2("The store cannot be read"), html.Pre(ov.error)], className="note note-warn")
    if not ov.exists or ov.empty:
        return welcome.layout()
    return html.Div(
        [
            page_header(
                "Runs",
                "Select runs (tick boxes, or a whole sweep) to look at them on every other page. "
                "Click a header to sort, use the filters under it to narrow down.",
                [html.Button("Clear selection", id="clear-selection", className="btn btn-small", n_clicks=0)],
            ),
            html.Div(_sweep_cards(db), id="sweep-cards", className="sweep-cards"),
            dag.AgGrid(
                id="runs-grid",
                columnDefs=COLUMN_DEFS,
                rowData=runs_rows(db),
                getRowId="params.data.run_id",
                defaultColDef={"sortable": True, "filter": True, "floatingFilter": True, "resizable": True},
                dashGridOptions={
                    "rowSelection": {"mode": "multiRow", "checkboxes": True, "headerCheckbox": True,
                                     "selectAll": "filtered", "enableClickSelection": True},
                    "selectionColumnDef": {"pinned": "left", "width": 48},
                    "animateRows": False,
                    "tooltipShowDelay": 300,
                    "rowHeight": 34,
                },
                columnSize="autoSize",
                style={"height": "620px", "width": "100%"},
                className="runs-grid",
            ),
            html.Div(
                [html.Span("Status colours: "),
                 *[html.Span(k, className=f"status-pill status-{k}", style={"--c": v})
                   for k, v in STATUS_COLORS.items()]],
                className="legend-row muted small",
            ),
        ]
    )


@callback(
    Output("runs-grid", "rowData"),
    Output("sweep-cards", "children"),
    Input("store-version", "data"),
    prevent_initial_call=True,
)
def refresh_rows(_version):
    db = queries.current_db()
    return runs_rows(db), _sweep_cards(db)


@callback(Output("selected-runs", "data"), Input("runs-grid", "selectedRows"), prevent_initial_call=True)
def selection_from_grid(rows):
    return sorted({r["run_id"] for r in rows or [] if r and "run_id" in r})


@callback(
    Output("runs-grid", "selectedRows"),
    Input("runs-grid", "rowData"),
    Input({"type": "select-sweep", "sweep": dash.ALL}, "n_clicks"),
    Input("clear-selection", "n_clicks"),
    State("selected-runs", "data"),
)
def selection_to_grid(rows, _sweep_clicks, _clear, selected):
    """Restore the session's selection when the grid (re)loads; select a sweep; clear."""
    trig = ctx.triggered_id
    if trig == "clear-selection":
        return {"ids": []}
    if isinstance(trig, dict) and trig.get("type") == "select-sweep":
        if not any(_sweep_clicks or []):
            return dash.no_update
        sweep = trig["sweep"]
        ids = [r["run_id"] for r in rows or [] if (r.get("sweep") or "(no sweep)") == sweep]
        return {"ids": ids}
    present = {r["run_id"] for r in rows or []}
    return {"ids": [i for i in selected or [] if i in present]}
