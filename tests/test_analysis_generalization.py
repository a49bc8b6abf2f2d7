"""Generalization gap and the LR x batch stability map."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dashboard.analysis import generalization, stability_map, steps_to_target
from dashboard.analysis.simulate import sweep


@pytest.fixture(scope="module")
def sim() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    return sweep(seeds=1, noise=0.03, seed=5)


def _evals(run_id: str, steps: list[int], train: list[float], test: list[float], batch: int) -> pl.DataFrame:
    n = len(steps)
    return pl.DataFrame({"run_id": [run_id] * 2 * n, "step": steps * 2, "split": ["train"] * n + ["test"] * n,
                         "examples": [s * batch for s in steps] * 2, "loss": train + test,
                         "accuracy": [1 - x for x in train] + [1 - x for x in test]})


def test_gap_grows_with_batch_size_in_the_synthetic_sweep(sim) -> None:
    runs, _, evals = sim
    gen = generalization(evals, runs, at="matched")
    assert gen.ok and gen.per_run.height == runs.filter(pl.col("status") == "finished").height
    gaps = gen.by_batch["gap_loss"].to_numpy()
    assert np.all(np.diff(gaps) > 0)  # the simulation makes the gap grow with B
    assert gen.rho_batch > 0.5 and gen.p_batch < 0.01
    assert gen.rho_noise < 0  # larger g = eps N / (B (1-m)) -> smaller gap
    assert "examples" in gen.at and gen.per_run["examples"].n_unique() == 1


def test_matched_progress_interpolates_and_leaves_out_short_runs() -> None:
    runs = pl.DataFrame({"run_id": ["a", "b", "c"], "batch_size": [10, 20, 10], "lr": [0.1, 0.2, 0.1],
                         "momentum": [0.9, None, 0.0], "train_size": [1000, 1000, 1000],
                         "status": ["finished", "finished", "running"]})
    ev = pl.concat([
        _evals("a", [10, 20, 30], [1.0, 0.8, 0.6], [1.1, 1.0, 0.9], 10),  # reaches 300 examples
        _evals("b", [5, 10], [0.9, 0.7], [1.0, 0.9], 20),  # reaches 200 examples
        _evals("c", [5], [1.0], [1.2], 10),  # still running, 50 examples
    ])
    gen = generalization(ev, runs, at="matched")
    assert gen.per_run["run_id"].to_list() == ["a", "b"]
    a = gen.per_run.filter(pl.col("run_id") == "a").row(0, named=True)
    assert a["examples"] == 200 and a["epochs"] == pytest.approx(0.2)
    assert a["train_loss"] == pytest.approx(0.8) and a["gap_loss"] == pytest.approx(0.2)
    assert a["noise_g"] == pytest.approx(0.1 * 1000 / (10 * 0.1))
    assert gen.per_run.filter(pl.col("run_id") == "b")["noise_g"][0] == pytest.approx(0.2 * 1000 / 20)
    assert any("unfinished" in w for w in gen.warnings)
    end = generalization(ev, runs, at="end")
    assert end.per_run.height == 3 and end.at == "end of training"
    assert end.per_run.filter(pl.col("run_id") == "a")["gap_loss"][0] == pytest.approx(0.3)
    at_e = generalization(ev, runs, at=0.25)
    assert at_e.per_run["run_id"].to_list() == ["a"]
    assert at_e.per_run["train_loss"][0] == pytest.approx(0.7)  # halfway between 200 and 300 examples
    assert np.isfinite(end.rho_batch)


def test_matched_training_loss_reads_each_run_where_its_train_loss_reaches_one_level() -> None:
    """Keskar's reading: a large batch that has barely trained is compared where it reaches the same training
    loss as the small one, not at the same examples; stalled runs are left out."""
    runs = pl.DataFrame({"run_id": ["small", "big", "stuck"], "batch_size": [8, 512, 512], "lr": 0.1,
                         "train_size": 1000, "status": "finished", "outcome": ["trained", "trained", "stalled"]})
    ev = pl.concat([
        _evals("small", [10, 20, 30], [1.0, 0.5, 0.2], [1.1, 0.62, 0.3], 8),  # gap 0.12 at train 0.5
        _evals("big", [1, 2, 4, 8], [2.0, 1.0, 0.6, 0.4], [2.0, 1.1, 0.9, 0.8], 512),  # at 0.5: between 4 and 8
        _evals("stuck", [1, 2], [2.3, 2.3], [2.3, 2.3], 512),
    ])
    gen = generalization(ev, runs, at="train_loss", loss_level=0.5)
    assert gen.at == "training loss 0.5" and gen.per_run["run_id"].to_list() == ["small", "big"]
    small, big = gen.per_run.row(0, named=True), gen.per_run.row(1, named=True)
    assert small["train_loss"] == pytest.approx(0.5) and small["gap_loss"] == pytest.approx(0.12)
    assert big["examples"] == pytest.approx(6 * 512) and big["train_loss"] == pytest.approx(0.5)
    assert big["gap_loss"] == pytest.approx(0.85 - 0.5)
    assert any("stalled" in w for w in gen.warnings)
    default = generalization(ev, runs)  # default level: the lowest every batch size reached = 0.4 (big's best)
    assert default.at == "training loss 0.4" and default.per_run["train_loss"].to_numpy() == pytest.approx(0.4)


def test_generalization_degenerate() -> None:
    runs = pl.DataFrame({"run_id": ["a"], "batch_size": [8], "lr": [0.1], "status": ["finished"]})
    only_train = _evals("a", [1, 2], [1.0, 0.5], [1.0, 0.5], 8).filter(pl.col("split") == "train")
    assert "both" in generalization(only_train, runs).reason
    nan_ev = _evals("a", [1, 2], [1.0, float("nan")], [1.0, float("nan")], 8)
    assert generalization(nan_ev, runs).reason is not None  # non-finite evals: diverged, left out
    assert generalization(nan_ev, runs, include_diverged=True).per_run.height == 1
    single = generalization(_evals("a", [1], [1.0], [1.5], 8), runs)
    assert single.ok and np.isnan(single.rho_batch) and single.per_run["gap_loss"][0] == pytest.approx(0.5)


def test_stability_map_marks_every_kind_of_cell() -> None:
    summary = pl.DataFrame({
        "run_id": list("abcdefgh"),
        "batch_size": [8, 8, 8, 8, 64, 64, 64, 64],
        "lr": [0.1, 0.1, 0.2, 0.4, 0.1, 0.2, 0.4, 0.8],
        "status": ["finished", "finished", "finished", "diverged", "finished", "running", "failed", "finished"],
        "final_loss": [0.30, 0.34, 0.25, float("nan"), 0.5, 0.6, None, float("inf")],
    })
    m = stability_map(summary)
    cells = {(r["batch_size"], r["lr"]): r for r in m.cells.iter_rows(named=True)}
    assert cells[(8.0, 0.1)]["value"] == pytest.approx(0.32) and cells[(8.0, 0.1)]["n_runs"] == 2
    assert cells[(8.0, 0.2)]["is_best"] and not cells[(8.0, 0.1)]["is_best"]
    assert cells[(8.0, 0.4)]["state"] == "diverged"
    assert cells[(64.0, 0.2)]["state"] == "unfinished" and cells[(64.0, 0.4)]["state"] == "failed"
    assert cells[(64.0, 0.8)]["state"] == "diverged"  # inf loss though "finished"
    assert cells[(64.0, 0.1)]["base_lr"] == pytest.approx(0.1 / 64)
    bb = {r["batch_size"]: r for r in m.by_batch.iter_rows(named=True)}
    assert bb[8.0]["best_lr"] == 0.2 and bb[8.0]["stable_decades"] == pytest.approx(np.log10(2))
    xs, ys, val, state = m.grid()
    assert list(xs) == [8, 64] and list(ys) == [0.1, 0.2, 0.4, 0.8]
    assert state[3, 0] == "" and np.isnan(val[3, 0])  # (lr 0.8, B 8) never run: not "diverged"
    xs, ys, val, state = m.grid("base_lr")
    assert len(ys) == 6  # 0.1/8 == 0.8/64: one base-LR row
    with pytest.raises(ValueError):
        m.grid("bogus")


def test_stability_map_accuracy_is_higher_better_and_takes_crossings(sim) -> None:
    runs, steps, _ = sim
    summary = pl.DataFrame({"run_id": ["a", "b"], "batch_size": [8, 8], "lr": [0.1, 0.2],
                            "final_test_accuracy": [0.9, 0.8]})
    m = stability_map(summary, metric="final_test_accuracy")
    assert m.by_batch["best_lr"][0] == 0.1
    hits = steps_to_target(steps, [0.5, 0.3], runs=runs)  # two rows per run: one cell entry per run
    grid = stability_map(hits, metric="final_value")
    assert grid.cells["n_runs"].sum() == runs.height
    assert grid.cells.filter(pl.col("state") == "diverged").height == 8  # lr x4 diverges at every B


def test_stable_range_can_ignore_runs_that_did_not_learn() -> None:
    summary = pl.DataFrame({"run_id": list("abcd"), "batch_size": [8] * 4, "lr": [0.01, 0.1, 1.0, 3.0],
                            "status": ["finished"] * 4, "final_test_accuracy": [0.95, 0.97, 0.96, 0.09]})
    wide = stability_map(summary, metric="final_test_accuracy").by_batch.row(0, named=True)
    assert wide["lr_stable_max"] == 3.0
    narrow = stability_map(summary, metric="final_test_accuracy", stable_within=0.1).by_batch.row(0, named=True)
    assert (narrow["lr_stable_min"], narrow["lr_stable_max"], narrow["best_lr"]) == (0.01, 1.0, 0.1)
