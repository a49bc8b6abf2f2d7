"""`python -m trainer sweep --launcher ...` for real: tiny digits runs through slurm (a stub sbatch that
runs the array tasks here), submitit's local executor and a local Ray; a preempted cell resumes as its
next attempt, and a re-launch runs only the missing cells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ("--steps", "20", "--eval-every", "10", "--gns-every", "0")  # a few seconds per run, mostly startup


def env_without_cluster(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BATCHSCOPE_", "RANK", "WORLD_SIZE"))}
    return env | {"PYTHONPATH": str(ROOT)} | extra


def sweep(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "sweep", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or env_without_cluster(), timeout=timeout, stdin=subprocess.DEVNULL)


def runs(db: Path) -> list[dict]:
    with duckdb.connect(str(db), read_only=True) as con:
        cur = con.execute("SELECT name, status, cell_id, attempt, launcher, job_id, array_job_id, array_task_id, rank, "
                          "world_size, git_commit FROM run_status ORDER BY cell_id, attempt")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


STUB_SBATCH = """\
import json, os, re, subprocess, sys
# A stand-in for sbatch: records its call, then (unless STUB_MODE=record) runs every task of the
# array here, one after the other, with the variables SLURM gives an array task.
log = os.environ["STUB_LOG"]
script = sys.argv[-1]
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
job = 5000 + 100 * len(open(log).read().splitlines())
text = open(script).read()
if os.environ.get("STUB_MODE") != "record":
    lo, hi = map(int, re.search(r"^#SBATCH --array=(\\d+)-(\\d+)", text, re.M).groups())
    out = re.search(r"^#SBATCH --output=(\\S+)", text, re.M).group(1)
    for i in range(lo, hi + 1):
        env = os.environ | {"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_JOB_ID": str(job),
                            "SLURM_JOB_ID": str(job + 1 + i)}
        with open(out.replace("%A", str(job)).replace("%a", str(i)), "a") as f:
            subprocess.run(["bash", script], env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
print(f"{job};stubcluster")
"""


def make_stub(tmp_path: Path) -> Path:
    stub = tmp_path / "bin" / "sbatch"
    stub.parent.mkdir()
    stub.write_text(f"#!{sys.executable}\n" + STUB_SBATCH)
    stub.chmod(0o755)
    return stub


def wait_for_steps_segment(spool: Path, proc: subprocess.Popen) -> None:
    """Until the run has spooled steps (it is training), or the process ended (a test failure)."""
    while proc.poll() is None:
        if any(spool.rglob("*.steps.arrow")):
            return
        time.sleep(0.05)
    raise AssertionError(f"the cell ended before it was killed: {proc.stdout.read()}")


@pytest.mark.slow
def test_slurm_array_resumes_a_preempted_cell_as_its_next_attempt_and_skips_done_ones(tmp_path):
    db = tmp_path / "runs.duckdb"
    stub = make_stub(tmp_path)
    calls = tmp_path / "sbatch-calls"
    grid = ("--batch", "16,32", "--lr", "0.05", "--sweep", "grid", "--db", str(db), "--launcher", "slurm",
            "--partition", "debug", "--time", "10:00", "--cpus", "1", "--sbatch-arg=--account=ml")
    long_cell = ("--steps", "6000", "--eval-every", "2000", "--gns-every", "0")  # ~4 s: killed mid-run
    env = env_without_cluster(STUB_LOG=str(calls), BATCHSCOPE_SBATCH=str(stub))

    # 1. Submit: sbatch gets the script (recorded, not run) for a 2-task array.
    proc = sweep(*grid, *long_cell, env=env | {"STUB_MODE": "record"})
    assert proc.returncode == 0, proc.stderr
    assert "2 to run with slurm" in proc.stdout and "submitted job array 5100" in proc.stdout
    [call] = [json.loads(line) for line in calls.read_text().splitlines()]
    assert call[0] == "--parsable"
    script = Path(call[1])
    text = script.read_text()
    for directive in ("--array=0-1", "--partition=debug", "--time=10:00", "--cpus-per-task=1", "--requeue",
                      "--account=ml", f"--output={script.parent}/logs/%A_%a.out"):
        assert f"#SBATCH {directive}\n" in text
    manifest = json.loads(script.with_suffix(".json").read_text())
    assert [c["cell_id"] for c in manifest["cells"]] == ["b16-lr0.05-s0", "b32-lr0.05-s0"]

    # 2. The cluster runs the tasks: task 0 is preempted (its node dies mid-run: SIGKILL of the task).
    task = [sys.executable, "-m", "trainer.launchers.cell", str(script.with_suffix(".json"))]
    slurm = {"SLURM_ARRAY_JOB_ID": "5100", "SLURM_JOB_ID": "5101"}
    killed = subprocess.Popen(task, env=env | slurm | {"SLURM_ARRAY_TASK_ID": "0"}, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_steps_segment(Path(str(db) + ".spool"), killed)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        killed.stdout.close()
    # task 1 runs to the end
    done = subprocess.run(task, env=env | slurm | {"SLURM_JOB_ID": "5102", "SLURM_ARRAY_TASK_ID": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    # 3. Re-launch the same sweep: only the preempted cell is submitted, as its attempt 2, and runs.
    proc = sweep(*grid, *long_cell, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 already done; 1 to run with slurm" in proc.stdout
    second = json.loads(calls.read_text().splitlines()[-1])
    assert "#SBATCH --array=0-0\n" in Path(second[1]).read_text()
    assert [c["cell_id"] for c in json.loads(Path(second[1]).with_suffix(".json").read_text())["cells"]] == [
        "b16-lr0.05-s0"]
    rows = runs(db)
    head = {k: rows[0][k] for k in ("cell_id", "attempt", "status", "job_id", "array_task_id")}
    assert head == {"cell_id": "b16-lr0.05-s0", "attempt": 1, "status": "stale", "job_id": "5101", "array_task_id": 0}
    assert [(r["cell_id"], r["attempt"], r["status"], r["job_id"], r["array_job_id"], r["array_task_id"])
            for r in rows[1:]] == [
        ("b16-lr0.05-s0", 2, "finished", "5201", "5200", 0),  # the re-launch's array, task 0
        ("b32-lr0.05-s0", 1, "finished", "5102", "5100", 1),
    ]
    assert {(r["launcher"], r["rank"], r["world_size"], r["name"][:3]) for r in rows} == {
        ("slurm", 0, 1, "b16"), ("slurm", 0, 1, "b32")}
    log = script.parent / "logs" / "5200_0.out"
    assert "cell b16-lr0.05-s0 attempt 2" in log.read_text()

    # 4. A requeued task of the first array whose cell is done does nothing; a third launch submits nothing.
    again = subprocess.run(task + ["1"], env=env | slurm, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already done" in again.stdout
    proc = sweep(*grid, *long_cell, env=env)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    assert len(calls.read_text().splitlines()) == 2 and len(runs(db)) == 3


@pytest.mark.slow
def test_sigterm_to_a_ddp_task_ends_its_run_with_the_reason_and_is_not_retried(tmp_path):
    """What SLURM does at preemption or scancel: SIGTERM to the task; the cell passes it to torchrun, which
    passes it to the ranks; whatever code that ends with, a stopped task does not retry."""
    db = tmp_path / "runs.duckdb"
    stub = make_stub(tmp_path)
    env = env_without_cluster(STUB_LOG=str(tmp_path / "calls"), BATCHSCOPE_SBATCH=str(stub), STUB_MODE="record")
    proc = sweep("--batch", "16", "--lr", "0.05", "--steps", "20000", "--gns-every", "0", "--sweep", "term",
                 "--db", str(db), "--launcher", "slurm", "--retries", "2", "--nproc-per-node", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    [manifest] = (tmp_path / "runs.duckdb.sweeps" / "term").glob("launch-*.json")
    task = subprocess.Popen([sys.executable, "-m", "trainer.launchers.cell", str(manifest), "0"], env=env, cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_steps_segment(Path(str(db) + ".spool"), task)
        task.send_signal(signal.SIGTERM)  # to the task only: it must pass it on
        out, _ = task.communicate(timeout=120)
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
    assert task.returncode == 1, out
    assert out.count("attempt") == 1  # stopped by a signal: not retried
    with duckdb.connect(str(db), read_only=True) as con:
        [(status, reason, attempt, world, steps)] = con.execute(
            "SELECT status, status_reason, attempt, world_size, (SELECT count(*) FROM steps) FROM runs").fetchall()
    assert (status, attempt, world) == ("failed", 1, 2) and "SIGTERM" in reason and 0 < steps < 20000


@pytest.mark.slow
def test_submitit_local_executor_runs_a_small_sweep_of_ddp_cells(tmp_path):
    """Two cells, each a 2-rank torchrun job inside its submitit job; rank 0 writes each one's run."""
    pytest.importorskip("submitit")
    db = tmp_path / "runs.duckdb"
    proc = sweep("--batch", "16,32", "--lr", "0.1", "--sweep", "sub", "--db", str(db), "--launcher", "submitit",
                 "--submitit-cluster", "local", "--time", "10", "--nproc-per-node", "2", *RUN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 finished" in proc.stdout and "2 ranks per run (torchrun)" in proc.stdout
    rows = runs(db)
    assert [(r["cell_id"], r["status"], r["attempt"], r["launcher"], r["rank"], r["world_size"]) for r in rows] == [
        ("b16-lr0.1-s0", "finished", 1, "submitit", 0, 2), ("b32-lr0.1-s0", "finished", 1, "submitit", 0, 2)]
    assert all(r["job_id"] for r in rows) and len({r["job_id"] for r in rows}) == 2
    assert list((db.parent / "runs.duckdb.sweeps" / "sub" / "submitit").glob("*_log.out"))


@pytest.mark.slow
def test_a_sweep_of_ddp_cells_started_locally_is_finished_by_ray_with_only_the_missing_cell(tmp_path):
    """DDP cells under two launchers, one Ray start: the local launcher runs cell b16 (torchrun, 2 ranks);
    the grid grows and `--launcher ray` (a local ray.init()) skips the done cell and runs b32 as a Ray
    task asking for 2 CPUs, again under torchrun. Each cell is one run, written by rank 0."""
    pytest.importorskip("ray")
    db = tmp_path / "runs.duckdb"
    base = ("--lr", "0.1", "--sweep", "mixed", "--db", str(db), "--nproc-per-node", "2", *RUN)
    proc = sweep("--batch", "16", "--jobs", "1", *base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = sweep("--batch", "16,32", "--launcher", "ray", *base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 already done; 1 to run with ray, 2 ranks per run (torchrun)" in proc.stdout and "1 finished" in proc.stdout
    rows = runs(db)
    assert [(r["cell_id"], r["status"], r["attempt"], r["launcher"], r["rank"], r["world_size"]) for r in rows] == [
        ("b16-lr0.1-s0", "finished", 1, "local", 0, 2), ("b32-lr0.1-s0", "finished", 1, "ray", 0, 2)]
    assert rows[0]["job_id"] is None and len(rows[1]["job_id"]) >= 16  # a Ray task id (hex)


@pytest.mark.slow
def test_a_ddp_cell_runs_as_a_slurm_array_task(tmp_path):
    """The stub sbatch runs the array task here with SLURM's variables: the task starts torchrun, whose
    rank 0 writes the cell's one run with the array's ids."""
    db = tmp_path / "runs.duckdb"
    env = env_without_cluster(STUB_LOG=str(tmp_path / "calls"), BATCHSCOPE_SBATCH=str(make_stub(tmp_path)))
    proc = sweep("--batch", "32", "--lr", "0.1", "--sweep", "ddp", "--db", str(db), "--launcher", "slurm",
                 "--nproc-per-node", "2", "--cpus", "2", *RUN, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = Path(json.loads((tmp_path / "calls").read_text())[1])
    assert "#SBATCH --cpus-per-task=2\n" in script.read_text()
    assert "torch.distributed.run" in (script.parent / "logs" / "5100_0.out").read_text()
    rows = runs(db)
    assert [(r["cell_id"], r["status"], r["attempt"], r["launcher"], r["job_id"], r["array_job_id"],
             r["array_task_id"], r["rank"], r["world_size"]) for r in rows] == [
        ("b32-lr0.1-s0", "finished", 1, "slurm", "5101", "5100", 0, 0, 2)]
