"""Welcome: what to do with an empty store — train a run, or load the sample sweep shipped in sample_runs/."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import dash
from dash import Input, Output, State, callback, dcc, html

from dashboard import queries
from dashboard.components import register_page

register_page(__name__, path="/welcome", name="Welcome", title="batchscope · welcome", order=99, nav=False)


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


def welcome_content(db: Path) -> html.Div:
    samples = sample_runs_dir()
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
                    html.P(["This store is empty: ", html.Code(str(db))], className="muted"),
                ],
                className="welcome-hero",
            ),
            html.Div(
                [
                    html.Div(
                        [
                            html.H3("Look around first"),
                            html.P("Load the sample sweep: real digits runs over batch size × learning rate, "
                                   "made by our trainer."),
                            html.Button("Load sample runs", id="load-samples", className="btn btn-primary",
                                        disabled=samples is None, n_clicks=0),
                            dcc.Loading(html.Div(id="load-samples-result", className="muted"), type="dot"),
                            html.P(["Or from a shell: ",
                                    html.Code(f"python -m collector import sample_runs/ --db {db.name}")],
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
                                   "This page refreshes by itself as runs arrive."),
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
    return html.Div([welcome_content(db), dcc.Location(id="welcome-redirect", refresh=True)])


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
    ok, msg = load_sample_runs(queries.current_db())
    return msg, (f"/?loaded={time.time():.0f}" if ok else dash.no_update)


@callback(Output("welcome-redirect", "href"), Input("store-version", "data"), prevent_initial_call=True)
def runs_arrived(_version):
    """Leave the welcome page by itself once the store has runs (a trainer started, samples loaded)."""
    ov = queries.overview(queries.current_db())
    return f"/?ready={time.time():.0f}" if ov.exists and not ov.empty else dash.no_update
