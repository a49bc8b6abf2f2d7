"""`python -m trainer` end to end: real subprocesses writing a real DuckDB store through the collector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def trainer(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "BATCHSCOPE_DB"} | {"PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


def query(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_cli_trains_digits_and_writes_one_run(tmp_path):
    db = tmp_path / "store" / "runs.duckdb"
    db.parent.mkdir()  # a missing folder is refused (test_bad_db_path_...)
    proc = trainer("--batch", "32", "--lr", "0.1", "--epochs", "3", "--eval-every", "40", "--gns-every", "2",
                   env={"BATCHSCOPE_DB": str(db)})  # the default store comes from $BATCHSCOPE_DB
    assert proc.returncode == 0, proc.stderr
    [(run_id, name, status, task, batch, micro, accum, lr, train_size, device, config)] = query(
        db, "SELECT run_id, name, status, task, batch_size, micro_batch_size, accum_steps, lr, train_size, device, "
            "config FROM runs")
    assert run_id in proc.stdout and str(db) in proc.stdout
    assert (name, status, task, batch, micro, accum, lr, train_size, device) == (
        "digits-b32-lr0.1", "finished", "digits", 32, 32, 1, 0.1, 1438, "cpu")
    config = json.loads(config)
    assert config["epochs"] == 3 and config["plan"]["gns_every"] == 2 and config["task_info"]["test_size"] == 359
    n, first, last, examples, measured, with_b = query(
        db, "SELECT count(*), min(step), max(step), max(examples), count(g_small_sq), count(b_simple) FROM steps")[0]
    assert (n, first, last, examples) == (135, 1, 135, 135 * 32)
    assert measured == 67 and 0 < with_b <= 67  # every 2nd step; b_simple NULL until |G|^2 > 0
    rows = query(db, "SELECT b_small, b_big FROM steps WHERE g_small_sq IS NOT NULL GROUP BY ALL")
    assert rows == [(1.0, 32.0)]  # per-example norms (b_small = 1) against the whole batch
    evals = query(db, "SELECT split, count(*), max(step), min(accuracy) FROM evals GROUP BY split ORDER BY split")
    assert evals == [("test", 4, 135, pytest.approx(evals[0][3])), ("train", 4, 135, pytest.approx(evals[1][3]))]
    assert query(db, "SELECT max(accuracy) FROM evals WHERE split = 'test' AND step = 135")[0][0] > 0.8


BAD_INPUTS = [
    (["--batch", "0"], "--batch"),
    (["--batch", "-4"], "--batch"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--batch", "30", "--accum", "4"], "divisible"),
    (["--task", "imagenet"], "unknown task"),
    (["--optimizer", "lion"], "unknown optimizer"),
    (["--device", "tpu"], "device"),
    (["--device", "cuda"], "CUDA"),
    (["--task", "mnist", "--data-dir", "{tmp}/nothing-here"], "missing train-images-idx3-ubyte"),
    (["--task", "cifar10", "--data-dir", "{tmp}"], "missing data_batch_1"),
    (["--batch", "lots"], "expected an integer"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_no_run(tmp_path, capsys, args, needle):
    if args == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    db = tmp_path / "runs.duckdb"
    argv = [a.format(tmp=tmp_path) for a in args] + ["--db", str(db)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not db.exists() and not Path(f"{db}.spool").exists()


@pytest.mark.parametrize("where", ["directory", "missing folder"])
def test_bad_db_path_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, where):
    """In-process, like the bad inputs above (`python -m trainer`'s exit status is checked just below)."""
    db = tmp_path if where == "directory" else tmp_path / "no" / "such" / "runs.duckdb"
    code = main(["--db", str(db)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("is a directory" if where == "directory" else "does not exist") in err
    assert not (tmp_path / "no").exists() and not list(tmp_path.glob("*.spool"))


def test_bad_input_exit_code_through_python_m(tmp_path):
    db = tmp_path / "runs.duckdb"
    proc = trainer("--batch", "0", "--db", str(db))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not db.exists()


def test_diverging_lr_is_recorded_as_diverged(tmp_path):
    db = tmp_path / "runs.duckdb"
    proc = trainer("--task", "linreg", "--lr", "5", "--steps", "300", "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert "diverged" in proc.stdout
    [(status, n)] = query(db, "SELECT status, (SELECT count(*) FROM steps) FROM runs")
    assert status == "diverged" and 0 < n < 300


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for word in ("--batch", "--accum", "--gns-every", "--target-loss", "sweep", "BATCHSCOPE_DB"):
        assert word in out


@pytest.mark.slow
def test_sweep_runs_the_grid_under_one_name(tmp_path):
    db = tmp_path / "runs.duckdb"
    proc = trainer("sweep", "--batch", "16,64", "--lr", "0.05,10000", "--steps", "40", "--jobs", "2",
                   "--sweep", "grid", "--db", str(db), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 runs" in proc.stdout and "python -m dashboard" in proc.stdout
    rows = query(db, "SELECT name, sweep, status, batch_size, lr FROM runs ORDER BY batch_size, lr")
    assert [r[0] for r in rows] == ["b16-lr0.05", "b16-lr10000", "b64-lr0.05", "b64-lr10000"]
    assert {r[1] for r in rows} == {"grid"}
    assert [r[2] for r in rows] == ["finished", "diverged", "finished", "diverged"]


def test_sweep_rejects_a_bad_grid_before_starting(tmp_path, capsys):
    db = tmp_path / "runs.duckdb"
    code = main(["sweep", "--batch", "16,30", "--lr", "0.1", "--accum", "4", "--db", str(db)])
    assert code == 2 and "divisible" in capsys.readouterr().err and not db.exists()


PREEMPT = """
import os, signal, sys
from trainer import steplog, train
from trainer.cli import main

where, at, truth = sys.argv[1], int(sys.argv[2]), sys.argv[3]
trained = [0]  # the truth: StepLog.add runs once per step, after the update


def kill_at(owner, attr, after=False):
    original, calls = getattr(owner, attr), [0]

    def wrapped(*args, **kw):
        calls[0] += 1
        if calls[0] == at and not after:
            os.kill(os.getpid(), signal.SIGTERM)
        out = original(*args, **kw)
        if calls[0] == at and after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    setattr(owner, attr, wrapped)


add = steplog.StepLog.add
steplog.StepLog.add = lambda self, step, *a: (add(self, step, *a), trained.__setitem__(0, step))[0]
owner, attr, after = {"after-add": (steplog.StepLog, "add", True), "in-sync": (steplog.StepLog, "_sync", False),
                      "mid-step": (train, "compute_gradients", False)}[where]
kill_at(owner, attr, after)
code = main(sys.argv[4:])
open(truth, "w").write(str(trained[0]))
sys.exit(code)
"""


@pytest.mark.parametrize("where,at", [("after-add", 777), ("in-sync", 3), ("mid-step", 300)])
def test_sigterm_at_any_moment_keeps_every_step_trained(tmp_path, where, at):
    """SLURM preemption, `timeout`: SIGTERM ends the run failed with every step trained, the rows the
    loop holds for its next host sync and for its next hand-over to the collector included, wherever it lands."""
    db, truth = tmp_path / "runs.duckdb", tmp_path / "trained"
    proc = subprocess.run([sys.executable, "-c", PREEMPT, where, str(at), str(truth), "--batch", "32", "--lr", "0.1",
                           "--steps", "5000", "--db", str(db), "--no-progress"], capture_output=True, text=True,
                          cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=180)
    assert proc.returncode == 143, proc.stderr  # a shell's code for "killed by SIGTERM"
    assert proc.stderr.splitlines()[-1] == "stopped by SIGTERM: the run is recorded as failed with every step " \
                                           "trained so far"
    trained = int(truth.read_text())
    assert 0 < trained < 5000 and (where != "after-add" or trained == at)
    assert query(db, "SELECT status, status_reason FROM runs") == [("failed", "SIGTERM")]
    assert query(db, "SELECT count(*), min(step), max(step), count(DISTINCT step) FROM steps") == [
        (trained, 1, trained, trained)]
