"""Sweep launchers without a cluster: cells, commands (torchrun), the sbatch script, provenance, the
store's view of cells, retries as attempts, and the one-line error for a missing extra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

import collector
from collector.provenance import from_environ, git_commit, provenance
from trainer.launchers import LauncherUnavailable, load
from trainer.launchers.cell import CellState, cell_states, retryable, run_cell
from trainer.launchers.manifest import (
    Manifest,
    SweepError,
    cell_command,
    cell_env,
    check_same_options,
    make_cells,
    read_manifest,
    write_manifest,
)
from trainer.launchers.slurm import SlurmOptions, sbatch_script
from trainer.sweep import common_args, main

ROOT = Path(__file__).resolve().parents[1]


def test_cells_cover_the_grid_with_stable_ids_and_the_run_options():
    cells = make_cells(["--steps", "20"], [16, 32], [0.05, 0.1], [0, 1], sweep="s", db="/x.duckdb", threads=2)
    assert [c.cell_id for c in cells] == [f"b{b}-lr{lr}-s{s}" for b in (16, 32) for lr in (0.05, 0.1) for s in (0, 1)]
    c = cells[3]  # b16, lr 0.1, seed 1
    assert c.name == "b16-lr0.1-s1" and (c.batch, c.lr, c.seed) == (16, 0.1, 1)
    argv = list(c.argv)
    assert argv[:2] == ["--steps", "20"]
    for flag, value in (("--batch", "16"), ("--lr", "0.1"), ("--seed", "1"), ("--sweep", "s"), ("--db", "/x.duckdb"),
                        ("--name", "b16-lr0.1-s1"), ("--threads", "2")):
        assert argv[argv.index(flag) + 1] == value
    # one seed: the names are those of a plain grid
    assert make_cells([], [8], [1.0], [0], sweep="s", db="d", threads=1)[0].name == "b8-lr1"


def test_the_sweeps_own_options_never_reach_the_runs():
    argv = ["--batch", "16,32", "--lr=0.1", "--seed", "0,1", "--launcher", "slurm", "--partition", "gpu",
            "--sbatch-arg=--account=ml", "--sbatch-arg", "--qos=low", "--nproc-per-node", "2", "--steps", "30",
            "--optimizer", "adam", "--db", "x.duckdb", "--retries", "1", "--no-progress"]
    assert common_args(argv) == ["--steps", "30", "--optimizer", "adam", "--no-progress"]


def test_a_ddp_cell_runs_under_torchrun_of_the_same_python():
    [cell] = make_cells(["--steps", "5"], [64], [0.1], [0], sweep="s", db="d", threads=1)
    single = Manifest(sweep="s", db="d", launcher="local", cells=[cell])
    assert cell_command(single, cell) == [sys.executable, "-m", "trainer", *cell.argv]
    ddp = Manifest(sweep="s", db="d", launcher="slurm", cells=[cell], nproc_per_node=4, threads=2)
    assert cell_command(ddp, cell) == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                                       "--nproc-per-node", "4", "-m", "trainer", *cell.argv]
    env = cell_env(ddp, cell, attempt=3, job_id="77_1", base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "BATCHSCOPE_LAUNCHER": "slurm",
                   "BATCHSCOPE_CELL_ID": "b64-lr0.1-s0", "BATCHSCOPE_ATTEMPT": "3", "BATCHSCOPE_JOB_ID": "77_1"}


@pytest.mark.parametrize(("time", "minutes"), [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-12", 2160),
                                             ("1-00:30", 1470), ("0-0:0:30", 1), (None, None)])
def test_slurm_time_limits_in_minutes_for_submitit(time, minutes):
    submitit = pytest.importorskip("trainer.launchers.submitit")
    assert submitit.minutes(time) == minutes


def test_the_sbatch_script_is_one_array_task_per_cell(tmp_path):
    cells = make_cells([], [16, 32, 64], [0.1], [0], sweep="grid", db="/shared/r.duckdb", threads=4)
    m = Manifest(sweep="grid", db="/shared/r.duckdb", launcher="slurm", cells=cells, cwd="/home/me/my code",
                 threads=4, nproc_per_node=2)
    opts = SlurmOptions(partition="gpu", time="2:00:00", gpus=2, mem="16G", max_parallel=2,
                        extra=("--account=ml", "--constraint=a100"))
    text = sbatch_script(m, tmp_path / "launch-1.json", opts, tmp_path / "logs")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert directives == ["--job-name=batchscope-grid", "--array=0-2%2", f"--output={tmp_path}/logs/%A_%a.out",
                          "--open-mode=append", "--ntasks=1", "--cpus-per-task=8", "--requeue", "--partition=gpu",
                          "--time=2:00:00", "--gpus=2", "--mem=16G", "--account=ml", "--constraint=a100"]
    assert "cd '/home/me/my code'" in lines
    assert lines[-1] == (f"exec {sys.executable} -m trainer.launchers.cell {tmp_path}/launch-1.json "
                         '"$SLURM_ARRAY_TASK_ID"')
    # every #SBATCH line comes before the first command, as sbatch requires
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))


def test_a_manifest_reads_back_as_written(tmp_path):
    cells = make_cells(["--steps", "7"], [16], [0.05, 0.5], [3], sweep="s", db="/d", threads=1)
    m = Manifest(sweep="s", db="/d", launcher="ray", cells=cells, retries=2, nproc_per_node=2)
    path = write_manifest(m, tmp_path / "s")
    assert read_manifest(path) == m
    m2 = Manifest(sweep="s", db="/d", launcher="ray", cells=cells[:1])
    again = write_manifest(m2, tmp_path / "s")  # a later launch (same second, same process) never rewrites one
    assert again != path and read_manifest(path) == m and read_manifest(again) == m2
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([path.name, again.name])


def test_a_resumed_sweep_must_keep_its_options(tmp_path):
    check_same_options(tmp_path / "s", {"steps": 30, "optimizer": "sgd"})
    check_same_options(tmp_path / "s", {"optimizer": "sgd", "steps": 30})  # same options: fine
    with pytest.raises(SweepError, match=r"steps: 30 then, 40 now"):
        check_same_options(tmp_path / "s", {"steps": 40, "optimizer": "sgd"})


def test_provenance_from_the_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "SLURM_JOB_ID": "5002", "SLURM_ARRAY_JOB_ID": "5000",
           "SLURM_ARRAY_TASK_ID": "1", "BATCHSCOPE_CELL_ID": "b16-lr0.1-s0", "BATCHSCOPE_ATTEMPT": "2"}
    assert from_environ(env) == {"rank": 3, "world_size": 4, "array_job_id": "5000", "array_task_id": 1,
                                 "job_id": "5002", "launcher": "slurm", "cell_id": "b16-lr0.1-s0", "attempt": 2}
    # a batchscope launcher names itself and its own job id (a Ray task id, submitit's id)
    assert from_environ({"BATCHSCOPE_LAUNCHER": "ray", "BATCHSCOPE_JOB_ID": "abc"}) == {"launcher": "ray",
                                                                                        "job_id": "abc"}
    assert from_environ({}) == {}
    # odd values are dropped, never an error
    assert provenance({"RANK": "x", "BATCHSCOPE_ATTEMPT": "", "SLURM_ARRAY_TASK_ID": str(2**40),
                       "BATCHSCOPE_GIT_COMMIT": "c0ffee"}) == {"rank": 0, "git_commit": "c0ffee"}


def _git(repo: Path, *args: str) -> str:
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def test_git_commit_of_the_code_with_dirty_marker_and_none_outside_a_repo(tmp_path):
    repo = tmp_path / "code"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("x = 1\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-qm", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == head
    (repo / "train.py").write_text("x = 2\n")
    assert git_commit(repo) == head + "-dirty"
    (tmp_path / "plain").mkdir()
    assert git_commit(tmp_path / "plain") is None


def test_a_run_records_where_it_ran_and_survives_without_git(tmp_path):
    """A user's own loop started in a git repo under SLURM-like variables; then with no git on PATH."""
    repo = tmp_path / "code"
    repo.mkdir()
    script = repo / "loop.py"
    script.write_text(textwrap.dedent("""
        import sys
        import collector
        with collector.start_run(db=sys.argv[1], name="mine") as run:
            run.log_step(1, loss=1.0)
    """))
    _git(repo, "init", "-q")
    _git(repo, "add", "loop.py")
    _git(repo, "commit", "-qm", "loop")
    head = _git(repo, "rev-parse", "HEAD")
    db = tmp_path / "runs.duckdb"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BATCHSCOPE_"))}
    base |= {"PYTHONPATH": str(ROOT)}
    slurm = {"SLURM_JOB_ID": "911", "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "11", "RANK": "0"}
    for env in (base | slurm, base | {"PATH": str(tmp_path / "empty")}):
        proc = subprocess.run([sys.executable, str(script), str(db)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT launcher, job_id, array_job_id, array_task_id, rank, world_size, git_commit, "
                           "cell_id, attempt, host FROM runs ORDER BY started_at").fetchall()
    assert rows[0][:8] == ("slurm", "911", "900", 11, 0, 1, head, None)
    assert rows[1][:8] == (None, None, None, None, 0, 1, None, None)  # no git: no commit, and no failure
    assert rows[0][9] == os.uname().nodename


def _store_with_runs(db: Path, rows: list[tuple]) -> None:
    with collector.write_connection(db) as con:
        for run_id, sweep, cell, attempt, status, heartbeat_age in rows:
            con.execute("INSERT INTO runs (run_id, name, sweep, status, cell_id, attempt, started_at, heartbeat_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, now(), now() - to_seconds(?))",
                        [run_id, cell, sweep, status, cell, attempt, heartbeat_age])


def test_cell_states_say_what_is_done_running_or_to_retry(tmp_path):
    db = tmp_path / "runs.duckdb"
    _store_with_runs(db, [
        ("r1", "s", "a", 1, "failed", 0), ("r2", "s", "a", 2, "finished", 0),  # settled on its 2nd attempt
        ("r3", "s", "b", 1, "diverged", 0),  # a diverged cell is a result
        ("r4", "s", "c", 1, "stale", 0), ("r5", "s", "c", 2, "failed", 0),  # two tries, neither settled it
        ("r6", "s", "d", 1, "running", 5),  # alive elsewhere
        ("r7", "s", "e", 1, "running", 600),  # its heartbeat stopped: stale, retry it
        ("r8", "other", "a", 1, "finished", 0),  # another sweep's cell of the same name
    ])
    assert cell_states(db, "s") == {
        "a": CellState(attempts=2, done=True, running=False, run_id="r2"),
        "b": CellState(attempts=1, done=True, running=False, run_id="r3"),
        "c": CellState(attempts=2, done=False, running=False, run_id="r5"),
        "d": CellState(attempts=1, done=False, running=True, run_id="r6"),
        "e": CellState(attempts=1, done=False, running=False, run_id="r7"),
    }
    assert cell_states(tmp_path / "none.duckdb", "s") == {}
    # one run stands for each cell: the attempt that settled it, else the latest
    with duckdb.connect(str(db), read_only=True) as con:
        superseded = con.execute("SELECT run_id FROM run_attempts WHERE superseded ORDER BY run_id").fetchall()
    assert superseded == [("r1",), ("r4",)]


def _fake_trainer(tmp_path: Path, fail_times: int, code: int = 1) -> Path:
    """A stand-in for `python` that fails its first `fail_times` calls, then prints a finished run."""
    calls = tmp_path / "calls"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import os, sys
        with open({str(calls)!r}, "a") as f:
            f.write(os.environ["BATCHSCOPE_ATTEMPT"] + " " + os.environ["BATCHSCOPE_CELL_ID"] + "\\n")
        n = len(open({str(calls)!r}).read().splitlines())
        if n <= {fail_times}:
            print("boom", n, file=sys.stderr)
            sys.exit({code})
        print("run 0123456789ab finished: 5 steps")
    """))
    fake.chmod(0o755)
    return fake


def test_a_failed_cell_is_retried_as_its_next_attempts(tmp_path):
    [cell] = make_cells([], [16], [0.1], [0], sweep="s", db=str(tmp_path / "r.duckdb"), threads=1)
    m = Manifest(sweep="s", db=str(tmp_path / "r.duckdb"), launcher="local", cells=[cell], retries=3,
                 python=str(_fake_trainer(tmp_path, fail_times=2)), cwd=str(tmp_path))
    result = run_cell(m, 0, echo=False, state=CellState(attempts=4, done=False, running=False, run_id="x"))
    assert (result.status, result.attempt, result.run_id) == ("finished", 7, "0123456789ab")
    assert (tmp_path / "calls").read_text().split() == ["5", cell.cell_id, "6", cell.cell_id, "7", cell.cell_id]


def test_retries_run_out_and_bad_input_is_not_retried(tmp_path):
    [cell] = make_cells([], [16], [0.1], [0], sweep="s", db=str(tmp_path / "r.duckdb"), threads=1)
    m = Manifest(sweep="s", db=str(tmp_path / "r.duckdb"), launcher="local", cells=[cell], retries=1,
                 python=str(_fake_trainer(tmp_path, fail_times=5)), cwd=str(tmp_path))
    result = run_cell(m, 0, echo=False, state=None)
    assert (result.status, result.attempt, result.error) == ("failed", 2, "exit code 1: boom 2")
    (tmp_path / "calls").unlink()
    m.python = str(_fake_trainer(tmp_path, fail_times=5, code=2))
    result = run_cell(m, 0, echo=False, state=None)
    assert (result.status, result.attempt) == ("failed", 1)
    assert len((tmp_path / "calls").read_text().splitlines()) == 1


def test_only_error_exits_are_retried_at_once():
    assert [code for code in (0, 1, 2, 3, 130, 137, 143, -9, -15) if retryable(code)] == [1, 3]


def test_a_missing_engine_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "trainer.launchers.ray", raising=False)
    with pytest.raises(LauncherUnavailable, match=r"pip install 'batchscope\[ray\]'"):
        load("ray")
    db = tmp_path / "runs.duckdb"
    code = main(["--batch", "16", "--lr", "0.1", "--launcher", "ray", "--db", str(db)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "batchscope[ray]" in err
    assert not db.exists() and not (tmp_path / "runs.duckdb.sweeps").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--partition", "gpu"], "--partition is for --launcher slurm or submitit, not local"),
    (["--launcher", "ray", "--jobs", "2"], "--jobs is for --launcher local, not ray"),
    (["--launcher", "submitit", "--sbatch-arg=--qos=low"], "--sbatch-arg is for --launcher slurm, not submitit"),
    (["--launcher", "slurm", "--sbatch", "/nonexistent/sbatch"], "'/nonexistent/sbatch' not found"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be positive"),
])
def test_launcher_options_are_checked_before_anything_is_written(tmp_path, capsys, args, message):
    db = tmp_path / "runs.duckdb"
    code = main(["--batch", "16", "--lr", "0.1", "--db", str(db), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
