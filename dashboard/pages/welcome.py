"""Welcome: how to start — train a run, log from any loop, or load the sample sweeps shipped in sample_runs/
(digits with SGD, and sample_runs/charlm with AdamW). Opened by itself for an empty store, and from the
nav at any time; only the automatic visit leaves for Runs once runs arrive."""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from pathlib import Path

import dash
import polars as pl
from dash import Input, Output, State, callback, dcc, html

from dashboard import queries
from dashboard.components import register_page

register_page(__name__, path="/welcome", name="Welcome", title="batchscope · welcome", order=99)


def sample_runs_dir() -> Path | None:
    """sample_runs/ of a source checkout (next to the packages), or of the working directory."""
    for cand in (Path(__file__).resolve().parents[2] / "sample_runs", Path.cwd() / "sample_runs"):
        if cand.is_dir() and any(cand.glob("*.parquet")):
            return cand
    return None


def load_sample_runs(db: Path, folder: Path | None = None, timeout: float = 300.0) -> tuple[bool, str]:
    """Import sample_runs/ into the store with the collector's loader (a subprocess: it writes)."""
    folder = folder or sample_runs_dir()
    if folder is None:
        return False, "sample_runs/ was not found next to the dashboard or in the working directory."
    cmd = [sys.executable, "-m", "collector", "import", str(folder), "--db", str(db)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"Loading took over {timeout:.0f} s and was stopped."
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return False, "Loading failed: " + " ".join(tail)
    queries.clear_cache()
    return True, (proc.stdout.strip().splitlines() or ["Loaded."])[-1]


def sample_folders() -> list[Path]:
    """Every shipped sample sweep: sample_runs/ itself and each sub-folder holding a runs.parquet."""
    top = sample_runs_dir()
    if top is None:
        return []
    return [top, *sorted(d for d in top.iterdir() if d.is_dir() and (d / "runs.parquet").exists())]


def _sample_meta(folder: Path) -> tuple[frozenset, str]:
    """(run ids, 'sweep (N runs, optimizer)') of a sample folder; read once per version of its file."""
    f = folder / "runs.parquet"
    return _read_sample_meta(str(f), f.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_sample_meta(path: str, _mtime: int) -> tuple[frozenset, str]:
    folder = Path(path).parent
    runs = pl.read_parquet(path, columns=["run_id", "sweep", "optimizer"])
    sweeps = ", ".join(sorted({str(x) for x in runs["sweep"].drop_nulls()})) or folder.name
    opts = "/".join(sorted({str(x) for x in runs["optimizer"].drop_nulls()}))
    return frozenset(runs["run_id"].to_list()), f"{sweeps} ({runs.height} runs, {opts})"


def missing_samples(db: Path) -> list[tuple[Path, str]]:
    """(folder, description) of the sample sweeps the store lacks (some of their runs are not in it)."""
    ov = queries.overview(db)
    have = set(queries.run_table(db)["run_id"].to_list()) if ov.exists and not ov.empty and not ov.error else set()
    out = []
    for folder in sample_folders():
        ids, what = _sample_meta(folder)
        if not ids <= have:
            out.append((folder, what))
    return out


def load_missing_samples(db: Path) -> tuple[bool, str]:
    """Import every sample sweep the store lacks; (all loaded, one line per folder)."""
    todo = missing_samples(db)
    if not todo:
        return True, "The sample sweeps are already in the store."
    lines, ok = [], True
    for folder, what in todo:
        done, msg = load_sample_runs(db, folder)
        ok &= done
        lines.append(f"{what}: {msg}")
    return ok, " · ".join(lines)


def sample_offer(db: Path) -> html.Div | None:
    """The Runs page's offer to load the sample sweeps, while the store lacks one of them."""
    todo = missing_samples(db)
    if not todo:
        return None
    return html.Div(
        [html.P(["Look around with the shipped sample sweeps: ", html.B(" and ".join(w for _, w in todo)), "."]),
         html.Button("Load the sample sweep" + ("s" if len(todo) > 1 else ""), id="runs-load-samples",
                     className="btn btn-primary btn-small", n_clicks=0, type="button"),
         dcc.Loading(html.Span(id="runs-load-samples-result", className="muted small"), type="dot"),
         dcc.Location(id="runs-samples-redirect", refresh=True)],
        className="note note-info sample-offer", id="sample-offer",
    )


def welcome_content(db: Path) -> html.Div:
    samples = sample_runs_dir()
    ov = queries.overview(db)
    todo = missing_samples(db) if samples is not None else []
    if not ov.exists or ov.empty:
        state = html.P(["This store is empty: ", html.Code(str(db))], className="muted")
    else:
        state = html.P([f"This store holds {ov.runs:,} run{'s' if ov.runs != 1 else ''}: ", html.Code(str(db)), " · ",
                        dcc.Link("see them on Runs", href="/")], className="muted")
    if samples is None:
        sample_text = "sample_runs/ was not found next to the dashboard or in the working directory."
    elif todo:
        sample_text = (f"Load the sample sweep{'s' if len(todo) > 1 else ''}, made by our trainer: "
                       + " and ".join(w for _, w in todo) + ".")
    else:
        sample_text = "The sample sweeps are in this store already: select one on the Runs page."
    return html.Div(
        [
            html.Div(
                [
                    html.H1("Welcome to batchscope"),
                    html.P(
                        "Which batch size and learning rate should you use, and what does a bigger batch buy "
                        "you? batchscope measures it: the critical batch size, the steps-versus-examples "
                        "tradeoff, the gradient noise scale and the generalization gap, from your own runs.",
                        className="lede",
                    ),
                    state,
                ],
                className="welcome-hero",
            ),
            html.Div(
                [
                    html.Div(
                        [
                            html.H3("Look around first"),
                            html.P(sample_text),
                            html.Button("Load the sample sweep" + ("" if len(todo) == 1 else "s"), id="load-samples",
                                        className="btn btn-primary",
                                        disabled=not todo, n_clicks=0, type="button"),
                            dcc.Loading(html.Div(id="load-samples-result", className="muted"), type="dot"),
                            html.P(["Or from a shell: ",
                                    html.Code(f"python -m collector import sample_runs/ --db {db.name}"), " and ",
                                    html.Code(f"python -m collector import sample_runs/charlm --db {db.name}")],
                                   className="muted small"),
                        ],
                        className="card",
                    ),
                    html.Div(
                        [
                            html.H3("Train your own"),
                            html.P("One run of the default task, no download, CPU or CUDA:"),
                            html.Pre(f"python -m trainer --batch 32 --lr 0.1 --db {db.name}"),
                            html.P("A sweep over batch sizes and learning rates: see python -m trainer --help. "
                                   "The pages refresh by themselves as runs arrive."),
                        ],
                        className="card",
                    ),
                    html.Div(
                        [
                            html.H3("Log from any training loop"),
                            dcc.Markdown(
                                "```python\nimport collector\nwith collector.start_run(name=\"b32\", batch_size=32, "
                                "lr=0.1) as run:\n    for step in ...:\n        run.log_step(step, examples=..., "
                                "loss=float(loss))\n```"
                            ),
                        ],
                        className="card",
                    ),
                ],
                className="cards-3",
            ),
        ],
        className="welcome",
    )


def layout(**_kwargs):
    db = queries.current_db()
    ov = queries.overview(db)
    return html.Div([welcome_content(db), dcc.Location(id="welcome-redirect", refresh=True),
                     dcc.Store(id="welcome-opened-empty", data=bool(not ov.exists or ov.empty))])


@callback(
    Output("load-samples-result", "children"),
    Output("welcome-redirect", "href", allow_duplicate=True),
    Input("load-samples", "n_clicks"),
    State("load-samples", "disabled"),
    prevent_initial_call=True,
)
def on_load(n_clicks, disabled):
    if not n_clicks or disabled:
        return dash.no_update, dash.no_update
    ok, msg = load_missing_samples(queries.current_db())
    return msg, (f"/?loaded={time.time():.0f}" if ok else dash.no_update)


@callback(
    Output("runs-load-samples-result", "children"),
    Output("runs-samples-redirect", "href"),
    Input("runs-load-samples", "n_clicks"),
    prevent_initial_call=True,
)
def on_load_from_runs(n_clicks):
    """The Runs page's button: load what is missing, then reload Runs with the new sweeps."""
    if not n_clicks:
        return dash.no_update, dash.no_update
    ok, msg = load_missing_samples(queries.current_db())
    return msg, (f"/?loaded={time.time():.0f}" if ok else dash.no_update)


@callback(Output("welcome-redirect", "href"), Input("store-version", "data"), State("welcome-opened-empty", "data"),
          prevent_initial_call=True)
def runs_arrived(_version, opened_empty):
    """Leave the welcome page by itself once an empty store has runs (a trainer started, samples loaded);
    a visit from the nav stays."""
    if not opened_empty:
        return dash.no_update
    ov = queries.overview(queries.current_db())
    return f"/?ready={time.time():.0f}" if ov.exists and not ov.empty else dash.no_update
