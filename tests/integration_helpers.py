"""What the integration and example tests read back from a store: runs with their steps and evals."""

from __future__ import annotations

from pathlib import Path

from collector.store import read_connection


def stored(db: Path, name: str | None = None) -> tuple[dict, list[dict], list[dict]]:
    """The store's one run (or the one run called `name`) with its steps and evals, ordered by step."""
    where, params = ("WHERE name = ?", [name]) if name is not None else ("", [])
    with read_connection(db) as con:
        runs = con.sql(f"SELECT * FROM runs {where}", params=params).pl().to_dicts()
        assert len(runs) == 1, [r["name"] for r in runs]
        run_id = [runs[0]["run_id"]]
        steps = con.sql("SELECT * FROM steps WHERE run_id = ? ORDER BY step", params=run_id).pl().to_dicts()
        evals = con.sql("SELECT * FROM evals WHERE run_id = ? ORDER BY step", params=run_id).pl().to_dicts()
    return runs[0], steps, evals
