"""Runs: every run in a sortable, filterable grid, grouped by sweep; the selection drives every other page.
Each row links to its run page and says where the run ran (host, rank, launcher and job ids, attempt,
git commit: collector/provenance.py). While the store lacks the shipped sample sweeps, one button loads them."""

from __future__ import annotations

from pathlib import Path

import dash
import dash_ag_grid as dag
import polars as pl
from dash import Input, Output, State, callback, ctx, html

from dashboard import queries
from dashboard.components import page_header, register_page, run_href
from dashboard.pages import welcome
from dashboard.theme import STATUS_COLORS, batch_color, fmt, plural

register_page(__name__, path="/", name="Runs", title="batchscope · runs", order=0)

_NUM = {"type": "numericColumn", "filter": "agNumberColumnFilter"}
_FMT3 = {"function": "params.value == null ? '' : d3.format('.3~g')(params.value)"}
_FMT_PCT = {"function": "params.value == null ? '' : d3.format('.1%')(params.value)"}
_FMT_INT = {"function": "params.value == null ? '' : d3.format(',d')(params.value)"}
_FMT_S = {"function": "params.value == null ? '' : d3.format('.3~s')(params.value) + 's'"}

COLUMN_DEFS = [
    {"field": "status", "width": 120, "pinned": "left",
     "cellClass": {"function": "'status-cell status-' + params.value"}},
    {"field": "name", "minWidth": 170, "pinned": "left", "cellRenderer": "RunLink",
     "headerTooltip": "the run's page: config, status history, evaluations, scalars and curves"},
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

# Where the run ran (runs table; collector/provenance.py). A column the store has no value for is left out.
PROVENANCE_DEFS = [
    {"field": "host", "width": 110},
    {"field": "rank", "width": 85, **_NUM, "headerTooltip": "global rank that wrote the run (torchrun RANK)"},
    {"field": "world_size", "headerName": "ranks", "width": 90, **_NUM, "headerTooltip": "data-parallel world size"},
    {"field": "launcher", "width": 110, "headerTooltip": "local, slurm, submitit or ray"},
    {"field": "job", "width": 130, "headerTooltip": "the launcher's job id; SLURM arrays: ARRAY_JOB_ID_TASK_ID"},
    {"field": "attempt", "width": 100, **_NUM, "headerTooltip": "which try of its sweep cell (retries after a failure or preemption)"},
    {"field": "git_commit", "headerName": "git commit", "width": 130,
     "headerTooltip": "HEAD of the training code's repository; -dirty: uncommitted changes"},
]


def provenance(db: Path) -> pl.DataFrame:
    """run_id, host, rank, world_size, launcher, job, attempt, git_commit (short) for the grid."""
    p = queries.run_provenance(db)
    null = pl.lit(None, dtype=pl.String)
    def col(c: str) -> pl.Expr:
        return pl.col(c).cast(pl.String)

    have = set(p.columns)
    array = (pl.when(pl.col("array_job_id").is_not_null()).then(
        pl.concat_str([col("array_job_id"), pl.lit("_"), pl.coalesce(col("array_task_id"), pl.lit("?"))]))
        if "array_job_id" in have and "array_task_id" in have else null)
    job = pl.coalesce(array, col("job_id") if "job_id" in have else null).alias("job")
    commit = (pl.when(col("git_commit").str.ends_with("-dirty"))
              .then(col("git_commit").str.slice(0, 10) + "-dirty").otherwise(col("git_commit").str.slice(0, 10))
              if "git_commit" in have else null).alias("git_commit")
    keep = [pl.col(c) for c in ("host", "rank", "world_size", "launcher", "attempt") if c in have]
    return p.select("run_id", *keep, job, commit)


def column_defs(rows: list[dict]) -> list[dict]:
    """The grid's columns: the run columns, then the provenance columns some run has a value for."""
    extra = [d for d in PROVENANCE_DEFS if any(r.get(d["field"]) is not None for r in rows)]
    return COLUMN_DEFS[:-1] + extra + COLUMN_DEFS[-1:]


@queries.in_session
def runs_rows(db: Path) -> list[dict]:
    """The grid's rows: run_summary with a colour per batch size and readable timestamps."""
    table = queries.run_table(db)
    if table.is_empty():
        return []
    table = table.with_columns(
        [pl.col(c).dt.strftime("%Y-%m-%d %H:%M:%S") for c, t in table.schema.items() if t.is_temporal()]
    )
    prov = provenance(db)
    table = table.drop([c for c in prov.columns if c != "run_id" and c in table.columns]).join(
        prov, on="run_id", how="left")
    rows = table.to_dicts()
    for r in rows:
        r["batch_color"] = batch_color(r.get("batch_size"))
        r["run_href"] = run_href(r["run_id"])
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
        bits = [plural(s["runs"], "run"), f"{plural(s['batches'], 'batch size')} × {plural(s['lrs'], 'LR')}"]
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
    rows = runs_rows(db)
    return html.Div(
        [
            welcome.sample_offer(db),
            page_header(
                "Runs",
                "Select runs (tick boxes, or a whole sweep) to look at them on every other page. "
                "Click a header to sort, use the filters under it to narrow down.",
                [html.Button("Clear selection", id="clear-selection", className="btn btn-small", n_clicks=0)],
            ),
            html.Div(_sweep_cards(db), id="sweep-cards", className="sweep-cards"),
            dag.AgGrid(
                id="runs-grid",
                columnDefs=column_defs(rows),
                rowData=rows,
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
