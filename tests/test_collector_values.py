"""Values are checked at the call: each one either raises there or is stored exactly (read back from the
DuckDB file); nothing accepted fails later (finish, ingest, the next run's recovery)."""

from __future__ import annotations

import math
import subprocess
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import duckdb
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import collector
from collector.spool import Spool
from collector.store import spool_root
from collector.values import EVAL_KINDS, RUN_KINDS, STEP_KINDS

ROOT = Path(__file__).resolve().parents[1]
NUMPY_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
                "float64", "longdouble", "bool", "complex64", "datetime64[s]", "timedelta64[s]", "U3"]
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
                torch.int64, torch.uint8, torch.bool, torch.complex64]

python_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**64), 2**64), st.floats(),
    st.decimals(allow_nan=True), st.fractions(), st.complex_numbers(), st.text(st.characters(codec=None), max_size=4),
    st.binary(max_size=3), st.just([1.0]), st.just({"a": 1}), st.just(object()))
numpy_scalars = st.sampled_from(NUMPY_DTYPES).flatmap(lambda d: hnp.from_dtype(np.dtype(d)))
numpy_arrays = st.sampled_from(NUMPY_DTYPES[:12]).flatmap(
    lambda d: hnp.arrays(np.dtype(d), st.sampled_from([(), (1,), (2,)])))


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(st.sampled_from([(), (), (1,)]))
    value = draw(st.one_of(st.floats(-1e6, 1e6), st.integers(-100, 100), st.booleans()))
    return torch.full(shape, value).to(dtype)


values = st.one_of(python_values, numpy_scalars, numpy_arrays, tensors())


def _plain(v):
    """The number a value stands for (only used for values the collector accepted)."""
    if isinstance(v, np.ndarray):
        v = v[()]
    if isinstance(v, torch.Tensor):
        v = v.item()
    return v


def _same(kind: str, stored, given) -> bool:
    """Stored exactly: the same integer or text; for a DOUBLE the nearest double (float(v))."""
    v = _plain(given)
    if v is None or stored is None:
        return v is None and stored is None
    if kind == "DOUBLE":
        f = float(v)
        return (math.isnan(f) and math.isnan(stored)) or stored == f
    if kind in ("BIGINT", "INTEGER"):
        return type(stored) is int and stored == v
    return stored == v


def _status(losses) -> str:
    """What the run must end as: a non-finite training loss that was accepted makes it diverged."""
    return "diverged" if any(v is not None and not math.isfinite(float(_plain(v))) for v in losses) else "finished"


def _attempt(expected: list, call, *args, **kwargs) -> None:
    """Call a log function; it may refuse at once with TypeError/ValueError, nothing else."""
    try:
        call(*args, **kwargs)
    except (TypeError, ValueError):
        return
    expected.append((args, kwargs))


def _rows(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


STEP_ARGS = [c for c in STEP_KINDS if c != "step"]
RUN_ARGS = ["lr", "batch_size", "seed", "train_size", "task", "momentum", "accum_steps"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(run_field=st.sampled_from(RUN_ARGS), run_value=values, step_values=st.lists(
    st.tuples(values, st.sampled_from(STEP_ARGS), values), min_size=1, max_size=4),
    eval_values=st.tuples(values, values, values), scalar=st.tuples(values, values))
def test_every_value_raises_at_the_call_or_is_stored_exactly(tmp_path_factory, run_field, run_value, step_values,
                                                             eval_values, scalar):
    db = tmp_path_factory.mktemp("values") / "runs.duckdb"
    try:
        run = collector.start_run(db, name="prop", finish_timeout=30, **{run_field: run_value})
    except (TypeError, ValueError):
        run = collector.start_run(db, name="prop", finish_timeout=30)
        run_value = None
    steps, evals, scalars = [], [], []
    for i, (step, col, v) in enumerate(step_values):  # a generated step, then a known one for each value
        _attempt(steps, run.log_step, step, **{col: v})
        _attempt(steps, run.log_step, 10**6 + i, **{col: v})
    _attempt(evals, run.log_eval, 7, split="test", loss=eval_values[0], accuracy=eval_values[1],
             examples=eval_values[2])
    _attempt(evals, run.log_eval, eval_values[0], split="x")
    _attempt(scalars, run.log, scalar[0], thing=scalar[1])
    run.finish()

    status = _status(kw["loss"] for _, kw in steps if "loss" in kw)
    assert _rows(db, "SELECT status, status_reason FROM runs") == [(status, None)]
    assert _same(RUN_KINDS[run_field], _rows(db, f"SELECT {run_field} FROM runs")[0][0], run_value)
    stored_steps = {r[0]: r for r in _rows(db, f"SELECT {', '.join(STEP_KINDS)} FROM steps")}
    first: dict = {}
    for (step, *_), kwargs in steps:
        first.setdefault(int(_plain(step)), kwargs)
    assert set(stored_steps) == set(first)
    for step, kwargs in first.items():
        (col, v), = ((k, x) for k, x in kwargs.items())
        stored = stored_steps[step][list(STEP_KINDS).index(col)]
        if col == "wall_time" and v is None:  # not given: seconds since start_run
            assert isinstance(stored, float) and stored >= 0
        else:
            assert _same(STEP_KINDS[col], stored, v), (col, v)
    stored_evals = _rows(db, f"SELECT {', '.join(EVAL_KINDS)} FROM evals ORDER BY split")
    assert len(stored_evals) == len(evals)
    for (args, kwargs), row in zip(sorted(evals, key=lambda e: e[1]["split"]), stored_evals, strict=True):
        given_ = {"step": args[0], "split": kwargs["split"], "examples": kwargs.get("examples"),
                  "loss": kwargs.get("loss"), "accuracy": kwargs.get("accuracy")}
        for (col, kind), stored in zip(EVAL_KINDS.items(), row, strict=True):
            assert _same(kind, stored, given_[col]), (col, given_[col], stored)
    stored_scalars = _rows(db, "SELECT step, value FROM scalars")
    assert len(stored_scalars) == len(scalars)
    for ((step,), kwargs), (s_step, s_value) in zip(scalars, stored_scalars, strict=True):
        assert _same("BIGINT", s_step, step) and _same("DOUBLE", s_value, kwargs["thing"])
    assert not spool_root(db).joinpath("quarantine").exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(col=st.sampled_from(STEP_ARGS), data=st.one_of(
    hnp.arrays(st.sampled_from(NUMPY_DTYPES[:13]).map(np.dtype), 3),
    st.lists(st.one_of(st.none(), st.integers(), st.floats()), min_size=3, max_size=3)))
def test_log_steps_columns_raise_at_the_call_or_are_stored_exactly(tmp_path_factory, col, data):
    db = tmp_path_factory.mktemp("cols") / "runs.duckdb"
    with collector.start_run(db, name="cols") as run:
        try:
            run.log_steps({"step": np.array([1, 2, 3]), col: data})
            accepted = True
        except (TypeError, ValueError):
            accepted = False
    stored = [r[0] for r in _rows(db, f"SELECT {col} FROM steps ORDER BY step")]
    assert len(stored) == (3 if accepted else 0)
    for s, v in zip(stored, list(data), strict=False):
        assert _same(STEP_KINDS[col], s, v.item() if isinstance(v, np.generic) else v), (col, v, s)
    status = _status(list(data)) if accepted and col == "loss" else "finished"
    assert _rows(db, "SELECT status FROM runs") == [(status,)]


# The values that used to lose a whole run (finish() raised, the run ended stale with 0 rows) or break
# every later run's recovery: each is now refused at the call, and the run keeps everything else.
@pytest.mark.parametrize("call", [
    lambda r: r.log_step(2, examples=2**63), lambda r: r.log_step(2**70, loss=1.0),
    lambda r: r.log_step(2, batch_size=2**40), lambda r: r.log(20, big=2**1100),
    lambda r: r.log_step(2, loss=torch.ones(3)), lambda r: r.log_eval(2, loss="0.5"),
])
def test_out_of_range_values_are_refused_at_the_call_and_the_run_is_kept(tmp_path, call):
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db, name="x") as run:
        run.log_step(1, loss=1.0)
        with pytest.raises((TypeError, ValueError), match="range|must be|integer|real number"):
            call(run)
        run.log_step(3, loss=2**70, examples=np.uint32(7))  # an int loss becomes its double; fine
    assert _rows(db, "SELECT step, loss, examples FROM steps ORDER BY step") == [(1, 1.0, None), (3, 2.0**70, 7)]
    assert _rows(db, "SELECT status FROM runs") == [("finished",)]


def test_run_fields_are_checked_and_tensors_converted(tmp_path):
    db = tmp_path / "runs.duckdb"
    with pytest.raises(ValueError, match="batch_size=.* outside the INTEGER range"):
        collector.start_run(db, name="x", batch_size=2**70)
    with pytest.raises(ValueError, match="not valid text"):
        collector.start_run(db, name="x", sweep="\ud800")
    with collector.start_run(db, name="t", lr=torch.tensor(0.1, dtype=torch.float64), seed=np.int64(3),
                             config={"nan": math.nan, "path": Path("/x"), "d": Decimal("1.5"), "f": Fraction(1, 2)}) as run:
        run.log_step(1, loss=torch.tensor(0.5), lr=np.float32(0.25))
    assert _rows(db, "SELECT lr, seed, config->>'path', status FROM runs") == [(0.1, 3, "/x", "finished")]
    assert _rows(db, "SELECT loss, lr FROM steps") == [(0.5, 0.25)]


def test_a_bad_run_field_in_an_old_spool_does_not_break_later_runs(tmp_path):
    """A spool written by an older release (no checks at the call) with batch_size=2**70 in run.json:
    that field is stored NULL, its rows are recovered, and later runs and `collector ingest` work."""
    db = tmp_path / "runs.duckdb"
    spool = Spool(spool_root(db), "0123456789ab")
    spool.create_and_own()
    spool.write_run({"run_id": "0123456789ab", "name": "old", "status": "running", "batch_size": 2**70,
                     "lr": "tensor(0.1000)", "config": {"a": 1}})
    import pyarrow as pa
    spool.write_segment("steps", pa.table({"step": [1, 2], "loss": [1.0, 0.5]}))
    spool.release()
    res = subprocess.run([sys.executable, "-m", "collector", "ingest", "--db", str(db)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "recovered 1" in res.stdout and "batch_size" in res.stderr and res.stderr.count("\n") == 1
    assert _rows(db, "SELECT name, status, batch_size, lr FROM runs") == [("old", "stale", None, None)]
    assert _rows(db, "SELECT count(*) FROM steps") == [(2,)]
    with collector.start_run(db, name="later") as run:
        run.log_step(1, loss=1.0)
    assert _rows(db, "SELECT status FROM runs WHERE name = 'later'") == [("finished",)]
