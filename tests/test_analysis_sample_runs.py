"""The shipped sample sweep (sample_runs/, real trainer runs) can show what the papers found: budgets do not
decide the answer, stalled runs are failures, and every documented SQL query answers on it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import duckdb
import polars as pl
import pytest

from collector.store import read_connection
from dashboard import queries, sweeps
from dashboard.analysis import stability_map

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_runs"

pytestmark = pytest.mark.skipif(not any(SAMPLE.glob("*.parquet")), reason="sample_runs/ not shipped")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, sample_store) -> Path:
    return sample_store(tmp_path_factory.mktemp("sample") / "runs.duckdb", ("sample_runs",))


def _sql(db: Path, query: str) -> pl.DataFrame:
    with read_connection(db) as con:
        return con.sql(query).pl()


def test_every_batch_size_reaches_the_lowest_default_target(store: Path) -> None:
    """The budget lets the largest batch train as far as the smallest: every batch size reaches the lowest
    target of the Tradeoff page's default grid, and that target is a low loss (not a budget artefact)."""
    db = queries.configure(store)
    ids = queries.run_table(db)["run_id"].to_list()
    tr = sweeps.target_range(db, ids)
    lowest = sweeps.snap(sweeps.target_grid(tr)[-1])
    assert lowest <= 0.1, lowest
    hits = sweeps.hits_for(db, ids, (lowest,))
    per_batch = hits.group_by("batch_size").agg(pl.col("reached").any()).sort("batch_size")
    assert per_batch.height == 8 and per_batch["reached"].all(), per_batch
    crit = _sql(store, f"SELECT b_crit, reason FROM critical_batch([{lowest}], "
                       f"width_examples := {sweeps.default_smoothing(db, ids)})").row(0, named=True)
    assert crit["reason"] is None and crit["b_crit"] > 0


def test_runs_stuck_at_chance_are_stalled_not_stable(store: Path) -> None:
    """A digits run that never left ln 10 is a failed cell: never inside a batch size's stable LR range."""
    out = _sql(store, "SELECT * FROM run_outcomes()")
    stuck = out.filter(pl.col("end_loss") > 0.9 * math.log(10))  # within 10 % of chance
    assert stuck["outcome"].is_in(["stalled", "diverged"]).all(), stuck
    summary = _sql(store, "SELECT s.*, o.outcome FROM run_summary s JOIN run_outcomes() o USING (run_id)")
    smap = stability_map(summary)
    cells = smap.cells.join(smap.by_batch, on="batch_size")
    inside = cells.filter((pl.col("lr") >= pl.col("lr_stable_min")) & (pl.col("lr") <= pl.col("lr_stable_max")))
    assert (inside["state"] == "ok").all(), inside.filter(pl.col("state") != "ok")
    grid = _sql(store, "SELECT sum(n_stalled) AS n FROM lr_batch_grid")
    assert int(grid["n"][0]) == out.filter(pl.col("outcome") == "stalled").height  # each one counted as a failure


def test_documented_queries_answer_on_the_sample(store: Path) -> None:
    """Every query in docs/sql-examples.md runs on the sample sweep and returns rows."""
    text = (ROOT / "docs" / "sql-examples.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    queries_run = 0
    for block in blocks:
        for q in block.split(";"):
            body = "\n".join(line for line in q.splitlines() if not line.strip().startswith("--")).strip()
            if not body:
                continue
            assert _sql(store, body).height > 0, body
            queries_run += 1
    assert queries_run >= 8


def test_readme_snippet_gives_what_the_readme_says(store: Path) -> None:
    """The README's Python snippet, run on the sample sweep, prints the B_crit the README quotes, and the SQL
    macro agrees with it (one definition: the snippet, the SQL and the Tradeoff page cannot drift apart)."""
    from dashboard import analysis

    con = duckdb.connect(str(store), read_only=True)
    try:
        runs = con.sql("SELECT * FROM runs").pl()
        steps = con.sql("SELECT * FROM steps").pl()
        sql = con.sql("SELECT b_crit FROM critical_batch([0.1], width_examples := 1024)").fetchall()[0][0]
    finally:
        con.close()
    hits = analysis.steps_to_target(steps, 0.1, smoothing_examples=1024, runs=runs)
    fit = analysis.fit_tradeoff(analysis.best_per_batch(hits))
    assert fit.ok and fit.b_crit == pytest.approx(sql, rel=1e-3)
    readme = (ROOT / "README.md").read_text()
    quoted = f"B_crit {fit.b_crit:.1f}, 90 % CI {fit.b_crit_ci[0]:.1f}–{fit.b_crit_ci[1]:.1f}"
    assert quoted in readme, quoted
