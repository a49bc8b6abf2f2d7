"""One run, linkable as /run/<run_id>: headline numbers, its curves (training and evaluation loss, the noise
scales B_simple, preconditioned B_simple and B_noise, sharpness, learning rate), configuration, where it
ran (provenance), its status history (every attempt of its sweep cell), evaluations and scalars.

Reached from a click on any curve of the Curves and Noise scale pages and from the Runs grid
(components.run_href). Filled by a callback on the store version, so a running run's page follows it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from dash import Input, Output, callback, dcc, html

from dashboard import export, queries
from dashboard.components import register_page, run_href
from dashboard.theme import ACCENT, INK, MUTED, STATUS_COLORS, WARN, arr, empty_figure, figure, fmt, stat

register_page(__name__, path_template="/run/<run_id>", name="Run", order=99, nav=False,
              title=lambda run_id=None, **_: f"batchscope · run {run_id or ''}".strip())

GRAPHS = {"run-loss": "Loss", "run-noise": "Noise scales: B_simple, preconditioned B_simple, B_noise",
          "run-curvature": "Sharpness (top Hessian eigenvalue)", "run-lr": "Learning rate"}
PROVENANCE = (("host", "host"), ("device", "device"), ("rank", "rank"), ("world_size", "world size"),
              ("launcher", "launcher"), ("job_id", "job id"), ("array_job_id", "array job id"),
              ("array_task_id", "array task id"), ("cell_id", "sweep cell"), ("attempt", "attempt"),
              ("git_commit", "git commit"))
POINTS = 3000


def layout(run_id: str | None = None, **_kwargs):
    return html.Div([
        dcc.Store(id="run-page-id", data=run_id),
        html.Div(id="run-header"),
        html.Div(id="run-stats", className="stats"),
        html.Div([html.Div([html.Div(title, className="panel-title"), export.bar(g, full=True),
                            dcc.Graph(id=g, config=export.graph_config(g), figure=empty_figure(""))], className="panel")
                  for g, title in GRAPHS.items()], className="grid-2"),
        html.Div(id="run-tables"),
    ])


def _kv(rows: list[tuple[str, object]], id: str | None = None) -> html.Table:
    return html.Table(html.Tbody([html.Tr([html.Th(k), html.Td(_text(v))]) for k, v in rows]),
                      className="fit-table", **({"id": id} if id else {}))


def _text(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(v, float):
        return fmt(v, 4)
    return str(v)


def _table(df: pl.DataFrame, id: str | None = None, link: str | None = None) -> html.Table:
    head = html.Thead(html.Tr([html.Th(c) for c in df.columns]))
    body = [html.Tr([html.Td(dcc.Link(_text(v), href=run_href(v)) if c == link else _text(v)) for c, v in r.items()])
            for r in df.to_dicts()]
    return html.Table([head, html.Tbody(body)], className="fit-table", **({"id": id} if id else {}))


def config_rows(config) -> list[tuple[str, object]]:
    """The config JSON as (key, value) rows; nested values as compact JSON."""
    try:
        cfg = json.loads(config) if isinstance(config, str) else (config or {})
    except ValueError:
        return [("config", config)]
    return [(k, json.dumps(v) if isinstance(v, dict | list) else v) for k, v in cfg.items()]


def _line(x, y, name: str, color: str, rid: str, mode: str = "lines", dash: str | None = None, **extra) -> dict:
    return {"type": "scatter", "x": arr(x), "y": arr(y), "mode": mode, "name": name, "meta": {"run_id": rid},
            "line": {"color": color, "width": 1.8, **({"dash": dash} if dash else {})}, "marker": {"size": 6}, **extra}


def _pos(s: pl.Series) -> pl.Series:
    """Positive values only (a non-positive ratio means |G|² not resolved yet): gaps on the log axis."""
    return s.set(s <= 0, None)


@queries.in_session
def run_view(db: Path, run_id: str) -> dict:
    """Everything the page shows for one run (pure of Dash callbacks, so tests can call it)."""
    rec = queries.run_record(db, run_id)
    if rec is None:
        return {"missing": True}
    ids = [run_id]
    steps = queries.step_curves(db, ids, "loss", "step", POINTS)
    evals = queries.evals_frame(db, ids)
    ns = queries.noise_scale(db, ids, max_rows=POINTS)
    adam = queries.noise_scale_adam(db, ids, max_rows=POINTS)
    sc = queries.full_scalars(db, ids, ["b_noise", "sharpness"])
    lr = queries.step_curves(db, ids, "lr", "step", POINTS)
    loss = [_line(steps["x"], steps["y"], "train loss (per step)", MUTED, run_id, opacity=0.7)]
    for split, color in (("train", ACCENT), ("test", WARN)):
        e = evals.filter(pl.col("split") == split)
        if e.height:
            loss.append(_line(e["step"], e["loss"], f"{split} loss (eval)", color, run_id, "lines+markers"))
    noise = []
    if ns.height:
        noise.append(_line(ns["step"], _pos(ns["b_simple"]), "B_simple", ACCENT, run_id))
    if adam.height:
        noise.append(_line(adam["step"], _pos(adam["b_simple"]), "preconditioned (Adam)",
                           WARN, run_id, dash="dash"))
    bn = sc.filter(pl.col("name") == "b_noise")
    if bn.height:
        noise.append(_line(bn["step"], bn["value"], "B_noise (curvature)", INK, run_id, "markers",
                           marker={"symbol": "diamond", "size": 8, "color": INK}))
    sh = sc.filter(pl.col("name") == "sharpness")
    # titles are the panels'; the legend goes above the plot, clear of the axis title
    common = {"height": 360, "xaxis": {"title": {"text": "step"}}}
    figs = {
        "run-loss": figure(loss, yaxis={"title": {"text": "loss"}, "type": "log"},
                           meta=export.spec("steps", run_ids=ids, columns=["loss"]), **common),
        "run-noise": figure(noise, yaxis={"title": {"text": "examples"}, "type": "log"},
                            meta=export.spec("noise_scale", run_ids=ids, noise_window=0.1), **common)
        if noise else empty_figure("No noise-scale measurements in this run.", 340),
        "run-curvature": figure([_line(sh["step"], sh["value"], "sharpness", INK, run_id, "lines+markers")],
                                yaxis={"title": {"text": "λ_max"}},
                                meta=export.spec("scalars", run_ids=ids, names=["sharpness"]), **common)
        if sh.height else empty_figure("No curvature measured (train with --curvature).", 340),
        "run-lr": figure([_line(lr["x"], lr["y"], "learning rate", ACCENT, run_id)],
                         yaxis={"title": {"text": "learning rate"}}, meta=export.spec("steps", run_ids=ids, columns=["lr"]),
                         **common) if lr.height else empty_figure("No learning rate logged.", 340),
    }
    for fig in figs.values():
        if fig["data"]:
            fig["layout"]["margin"]["t"] = 64
            fig["layout"]["legend"] = {**fig["layout"]["legend"], "orientation": "h", "x": 0, "y": 1.02,
                                       "xanchor": "left", "yanchor": "bottom"}
    return {"missing": False, "record": rec, "figs": figs, "evals": evals, "scalars": queries.run_scalars(db, run_id),
            "history": queries.run_history(db, run_id), "b_noise": queries.b_noise_summary(db, ids),
            "b_simple_end": ns["b_simple"].drop_nulls().tail(1).to_list(), "adam_end": adam["b_simple"].drop_nulls().tail(1).to_list()}


def _header(rec: dict, db: Path) -> html.Div:
    status = rec.get("status") or "?"
    return html.Div([
        html.Div([html.H1(rec.get("name") or rec["run_id"], id="run-title"),
                  html.P([html.Span(status, className="badge", id="run-status",
                                    style={"color": STATUS_COLORS.get(status, MUTED)}),
                          f"  run {rec['run_id']}", f" · sweep {rec['sweep']}" if rec.get("sweep") else "",
                          f" · {rec.get('task') or ''} · {rec.get('optimizer') or ''} · B={rec.get('batch_size')} · "
                          f"lr={fmt(rec.get('lr'))} · seed {rec.get('seed')}"], className="lede"),
                  (html.P(f"Why {status}: {rec['status_reason']}", className="note note-warn")
                   if rec.get("status_reason") else None)],
                 className="page-title"),
        html.Div([dcc.Link("← all runs", href="/"), " · ", dcc.Link("curves", href="/curves")], className="page-controls"),
    ], className="page-header")


def _stats(view: dict) -> list:
    rec = view["record"]
    tokens = rec.get("tokens_per_step")
    bn = view["b_noise"].to_dicts()
    cards = [stat("Steps", fmt(rec.get("steps")), f"{fmt(rec.get('examples'))} examples"
                  + (f" · {fmt((rec.get('examples') or 0) * tokens / rec['batch_size'])} tokens" if tokens else "")),
             stat("Train loss", fmt(rec.get("final_train_loss") or rec.get("final_loss")), f"best {fmt(rec.get('best_loss'))}"),
             stat("Test loss", fmt(rec.get("final_test_loss")), f"accuracy {fmt(rec.get('final_test_accuracy'))}"),
             stat("B_simple at the end", fmt(view["b_simple_end"][0]) if view["b_simple_end"] else "—",
                  "tr(Σ)/|G|², centred window ×1.1", id="run-b-simple")]
    if view["adam_end"]:
        cards.append(stat("… preconditioned", fmt(view["adam_end"][0]), "B_simple of Adam's P·g", id="run-b-simple-adam"))
    if bn:
        cards.append(stat("B_noise", fmt(bn[0]["b_noise"]), f"tr(HΣ)/GᵀHG, last {bn[0]['n_evals']} evals "
                          f"(B_simple there {fmt(bn[0]['b_simple_same_batches'])})", id="run-b-noise", exact=bn[0]["b_noise"]))
    return cards


def _tables(view: dict, db: Path) -> list:
    rec = view["record"]
    prov = [(label, rec.get(k)) for k, label in PROVENANCE]
    prov += [("started", rec.get("started_at")), ("ended", rec.get("ended_at")), ("last heartbeat", rec.get("heartbeat_at")),
             ("recorded in", str(db))]
    history = view["history"].rename({"started_at": "started", "ended_at": "ended", "heartbeat_at": "last heartbeat",
                                      "status_reason": "reason"})
    ev = view["evals"].drop("run_id")
    return [
        html.Div([html.Div("Status history (every attempt of its sweep cell)", className="panel-title"),
                  _table(history, "run-history", link="run_id")], className="panel"),
        html.Div([html.Div([html.Div("Provenance", className="panel-title"), _kv(prov, "run-provenance")], className="panel"),
                  html.Div([html.Div(f"Scalars ({view['scalars'].height} names)", className="panel-title"),
                            _table(view["scalars"], "run-scalars")], className="panel")], className="grid-2"),
        html.Details([html.Summary(f"Evaluations ({ev.height})"), _table(ev, "run-evals")], className="panel",
                     open=ev.height <= 20),
        html.Details([html.Summary("Configuration"), _kv(config_rows(rec.get("config")), "run-config")],
                     className="panel", open=True),
    ]


@callback(
    *[Output(g, "figure") for g in GRAPHS],
    Output("run-header", "children"),
    Output("run-stats", "children"),
    Output("run-tables", "children"),
    Input("run-page-id", "data"),
    Input("store-version", "data"),
)
def update_run(run_id, _version):
    db = queries.current_db()
    view = run_view(db, str(run_id or "")) if queries.store_version(db) is not None else {"missing": True}
    if view["missing"]:
        blank = [empty_figure("")] * len(GRAPHS)
        msg = html.Div([html.H1("No such run"), html.P([f"The store has no run {run_id!r}. ",
                                                        dcc.Link("See all runs", href="/")])], className="note note-warn")
        return *blank, msg, [], []
    return *[view["figs"][g] for g in GRAPHS], _header(view["record"], db), _stats(view), _tables(view, db)
