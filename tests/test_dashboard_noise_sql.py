"""schema/sql/40_pages_a.sql on the shipped charlm sweep (AdamW, --curvature): the preconditioned B_simple,
B_noise per run and tokens seen, against the same rules computed here in numpy from the raw scalars."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import polars as pl
import pytest


@pytest.fixture(scope="module")
def con(tmp_path_factory, sample_store):
    db = sample_store(tmp_path_factory.mktemp("charlm") / "runs.duckdb", ("sample_runs/charlm",))
    c = duckdb.connect(str(db), read_only=True)
    yield c
    c.close()


def _pivot(con, names: list[str]) -> pl.DataFrame:
    raw = con.sql(f"SELECT run_id, step, name, value FROM scalars WHERE name IN {tuple(names)}").pl()
    return raw.pivot("name", index=["run_id", "step"], values="value").drop_nulls().sort("run_id", "step")


def test_preconditioned_b_simple_is_the_window_rule_on_the_adam_ingredients(con):
    w = 0.1
    p = _pivot(con, ["g_small_sq_adam", "b_small_adam", "g_big_sq_adam", "b_big_adam"])
    sql = con.sql(f"SELECT run_id, step, b_simple, n_noise FROM noise_scale_adam(noise_window := {w})").pl()
    assert sql.height == p.height > 100
    checked = 0
    for (rid,), part in p.group_by("run_id"):
        gs, bs = part["g_small_sq_adam"].to_numpy(), part["b_small_adam"].to_numpy()
        gb, bb = part["g_big_sq_adam"].to_numpy(), part["b_big_adam"].to_numpy()
        g2 = (bb * gb - bs * gs) / (bb - bs)
        tr = (gs - gb) / (1 / bs - 1 / bb)
        steps = part["step"].to_numpy().astype(float)
        mine = sql.filter(pl.col("run_id") == rid).sort("step")
        for s, b, n in zip(mine["step"].to_numpy(), mine["b_simple"].to_numpy(), mine["n_noise"].to_numpy(), strict=True):
            inside = (steps >= s / (1 + w)) & (steps <= s * (1 + w))
            assert n == inside.sum()
            assert b == pytest.approx(tr[inside].sum() / g2[inside].sum(), rel=1e-9)
            checked += 1
    assert checked == sql.height


def test_b_noise_summary_is_a_ratio_of_means_over_the_last_evaluations(con):
    p = _pivot(con, ["b_noise_tr_h_sigma", "b_noise_ghg", "b_noise_tr_sigma", "b_noise_g_sq"])
    sql = con.sql("SELECT * FROM b_noise_summary(tail := 0.2)").pl().sort("run_id")
    assert sql.height == p["run_id"].n_unique() >= 10
    for row in sql.to_dicts():
        part = p.filter(pl.col("run_id") == row["run_id"])
        lo, hi = part["step"].min(), part["step"].max()
        tail = part.filter(pl.col("step") >= hi - 0.2 * (hi - lo))
        assert row["n_evals"] == tail.height and row["last_step"] == hi
        assert row["b_noise"] == pytest.approx(tail["b_noise_tr_h_sigma"].mean() / tail["b_noise_ghg"].mean(), rel=1e-9)
        assert row["b_simple_same_batches"] == pytest.approx(
            tail["b_noise_tr_sigma"].mean() / tail["b_noise_g_sq"].mean(), rel=1e-9)


def test_tokens_seen_are_examples_times_the_context(con):
    rows = con.sql("""SELECT r.batch_size, r.tokens_per_step, t.tokens_per_example, r.config
                      FROM runs r JOIN run_tokens t USING (run_id)""").pl()
    context = np.array([json.loads(c)["context"] for c in rows["config"]])
    np.testing.assert_array_equal(rows["tokens_per_example"].to_numpy(), context)  # charlm: a window per example
    np.testing.assert_array_equal(rows["tokens_per_step"].to_numpy(), rows["batch_size"].to_numpy() * context)
