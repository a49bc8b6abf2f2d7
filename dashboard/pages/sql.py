"""SQL: a read-only console over the store (rules and limits in collector.sql_engine, run by
dashboard.console in worker processes), with CSV export of the rows shown."""

from __future__ import annotations

import math
from pathlib import Path

import dash
import dash_ag_grid as dag
import polars as pl
from dash import Input, Output, State, callback, dcc, html

from dashboard import console, queries
from dashboard.components import register_page

register_page(__name__, path="/sql", name="SQL", title="batchscope · SQL", order=7)



def _jsonable(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


def console_view(db: Path, sql: str, row_limit: int | None = None, time_limit_s: float | None = None) -> dict:
    """Run a console query; a dict of what the page shows (ok, message, columnDefs, rowData)."""
    res = console.run_console(db, sql, row_limit=row_limit, time_limit_s=time_limit_s)
    if not res.ok or res.frame is None:
        return {"ok": False, "message": res.message, "columnDefs": [], "rowData": []}
    frame = res.frame
    cols = []
    for name, dtype in zip(frame.columns, frame.dtypes, strict=True):
        col = {"field": name, "headerName": name}
        if dtype.is_numeric():
            col["type"] = "numericColumn"
            col["filter"] = "agNumberColumnFilter"
        cols.append(col)
    rows = [{k: _jsonable(v) for k, v in r.items()} for r in frame.with_columns(
        [pl.col(c).cast(pl.String) for c, t in zip(frame.columns, frame.dtypes, strict=True)
         if not (t.is_numeric() or t == pl.String or t == pl.Boolean)]
    ).to_dicts()]
    return {"ok": True, "message": res.message, "columnDefs": cols, "rowData": rows}


def layout(**_kwargs):
    first = next(iter(console.EXAMPLE_QUERIES.values()))
    lim = console.LIMITS  # as configured at start (python -m dashboard --sql-max-rows ...)
    return html.Div(
        [
            html.Div([html.H1("SQL"),
                      html.P(["Read-only queries against the store: tables ", html.Code("runs"), ", ",
                              html.Code("steps"), ", ", html.Code("evals"), ", ", html.Code("scalars"),
                              ", the view ", html.Code("run_summary"), " and the macros ",
                              html.Code("steps_to_target(target)"), " and ", html.Code("noise_scale(noise_window)"),
                              f". One SELECT at a time; no files, network or extensions; at most "
                              f"{lim.timeout_s:g} s, {lim.max_rows:,} rows, {lim.memory_mb:,} MB of memory "
                              f"and {lim.max_response_mb:g} MB of results per query."],
                             className="lede")], className="page-title"),
            html.Div(
                [
                    html.Div(
                        [
                            dcc.Textarea(id="sql-text", value=first, className="sql-editor", spellCheck=False),
                            html.Div(
                                [html.Button("Run  (Ctrl+Enter)", id="sql-run", className="btn btn-primary",
                                             n_clicks=0),
                                 html.Button("Export CSV", id="sql-export", className="btn", n_clicks=0,
                                             disabled=True),
                                 html.Span(id="sql-message", className="sql-message")],
                                className="sql-actions",
                            ),
                        ],
                        className="sql-main",
                    ),
                    html.Div(
                        [html.Div("Examples", className="control-label"),
                         *[html.Button(name, id={"type": "sql-example", "index": i}, className="example-link",
                                       n_clicks=0)
                           for i, name in enumerate(console.EXAMPLE_QUERIES)]],
                        className="sql-examples",
                    ),
                ],
                className="sql-layout",
            ),
            dag.AgGrid(
                id="sql-grid", columnDefs=[], rowData=[],
                defaultColDef={"sortable": True, "filter": True, "resizable": True, "minWidth": 90},
                dashGridOptions={"animateRows": False, "enableCellTextSelection": True},
                style={"height": "480px", "width": "100%"},
            ),
            dcc.Store(id="sql-last", data=None),
            dcc.Download(id="sql-download"),
        ]
    )


@callback(
    Output("sql-text", "value"),
    Output("sql-grid", "columnDefs", allow_duplicate=True),
    Output("sql-grid", "rowData", allow_duplicate=True),
    Output("sql-message", "children", allow_duplicate=True),
    Output("sql-message", "className", allow_duplicate=True),
    Output("sql-export", "disabled", allow_duplicate=True),
    Output("sql-last", "data", allow_duplicate=True),
    Input({"type": "sql-example", "index": dash.ALL}, "n_clicks"),
    prevent_initial_call=True,
)
def pick_example(clicks):
    """An example replaces the text and clears the previous result and its timing."""
    trig = dash.ctx.triggered_id
    if not trig or not any(clicks or []):
        return (dash.no_update,) * 7
    return list(console.EXAMPLE_QUERIES.values())[trig["index"]], [], [], "", "sql-message", True, None


@callback(
    Output("sql-grid", "columnDefs"),
    Output("sql-grid", "rowData"),
    Output("sql-message", "children"),
    Output("sql-message", "className"),
    Output("sql-export", "disabled"),
    Output("sql-last", "data"),
    Input("sql-run", "n_clicks"),
    State("sql-text", "value"),
)
def run_sql(_n, sql):
    view = console_view(queries.current_db(), sql or "")
    cls = "sql-message ok" if view["ok"] else "sql-message error"
    can_export = view["ok"] and bool(view["rowData"])
    return (view["columnDefs"], view["rowData"], view["message"], cls, not can_export,
            sql if can_export else None)


def export_csv_text(db: Path, sql: str) -> str | None:
    """The CSV of the query shown (re-run under the same limits, so the same rows); None if it fails."""
    res = console.run_console(db, sql)
    return console.to_csv(res.frame) if res.ok and res.frame is not None else None


@callback(Output("sql-download", "data"), Input("sql-export", "n_clicks"), State("sql-last", "data"),
          prevent_initial_call=True)
def export_csv(n, sql):
    if not n or not sql:
        return dash.no_update
    text = export_csv_text(queries.current_db(), sql)
    if text is None:
        return dash.no_update
    return {"content": text, "filename": "batchscope-query.csv", "type": "text/csv"}
