"""Run one cell of a sweep: `python -m trainer.launchers.cell MANIFEST [INDEX]` (INDEX defaults to
$SLURM_ARRAY_TASK_ID). Every launcher ends up here, on whatever machine its task lands on.

The task asks the store first, so a requeued or re-launched task whose cell already finished (or
diverged: that is a result too) does nothing, and a cell whose earlier tries failed or died runs as the
next attempt of the same cell (runs.cell_id, runs.attempt) rather than as an unrelated run. Dead runs'
spools are recovered before counting, so a try killed by preemption counts as an attempt (`stale`).
The trainer runs as a child process (under torchrun for DDP cells); its output is passed through to
this task's log and kept to tell the outcome.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.launchers.manifest import Cell, Manifest, cell_command, cell_env, read_manifest

DONE = ("finished", "diverged")  # a diverged cell is a point of the stability map, not a failure


def retryable(returncode: int) -> bool:
    """Whether a failed try is worth another at once: an error exit, not bad input (2), Ctrl-C (130) or a
    signal (a negative code, or 128 + N from a shell): preempted, cancelled or killed means stop here
    (the engine's own requeue, if any, brings the cell back as its next attempt)."""
    return 0 < returncode < 128 and returncode != 2
_RESULT = re.compile(r"^run (\w{12}) (finished|diverged)", re.M)


@dataclass(frozen=True)
class CellState:
    """What the store knows about a cell: attempts so far and whether one of them settled it."""

    attempts: int
    done: bool
    running: bool  # an attempt is alive right now (fresh heartbeat), e.g. from another launch
    run_id: str | None  # the run that settled it, else the latest attempt


@dataclass(frozen=True)
class CellResult:
    cell_id: str
    name: str
    status: str  # finished, diverged, failed, or skipped (done already) / running (alive elsewhere)
    attempt: int | None
    run_id: str | None
    returncode: int
    seconds: float
    error: str | None = None


def cell_states(db: str | Path, sweep: str, timeout: float = 60.0) -> dict[str, CellState]:
    """Per cell_id, the store's view of this sweep's cells (the sweep_cells view); {} without a store.

    Raises collector.StoreError when the store stays locked for `timeout` s: running a cell without
    knowing whether it is done could run it twice, so the caller reports it instead."""
    import collector

    path = Path(db)
    if not path.exists():
        return {}
    collector.recover(path)  # dead tries become stale runs, and count as attempts
    with collector.read_connection(path, timeout=timeout) as con:
        rows = con.execute("SELECT cell_id, last_attempt, done, running, coalesce(result_run_id, last_run_id) "
                           "FROM sweep_cells WHERE sweep = ?", [sweep]).fetchall()
    return {r[0]: CellState(attempts=r[1] or 0, done=bool(r[2]), running=bool(r[3]), run_id=r[4]) for r in rows}


def _pump(stream, keep: list[str], echo_to) -> None:
    for line in stream:
        keep.append(line)
        if echo_to is not None:
            echo_to.write(line)
            echo_to.flush()


def run_process(cmd: list[str], env: dict, cwd: str, echo: bool) -> tuple[int, str, str, bool]:
    """Run the cell's process, passing its output through when `echo`; SIGTERM (preemption, scancel)
    is forwarded to it so the run can end itself with that reason. Returns (exit code, stdout, stderr,
    whether a SIGTERM was forwarded): a program that handles the signal may exit 1, not by the signal."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    previous = None
    stopped: list[int] = []

    def forward(signum, frame) -> None:
        stopped.append(signum)
        proc.send_signal(signal.SIGTERM)

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, forward)
    out: list[str] = []
    err: list[str] = []
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, sys.stdout if echo else None), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err, sys.stderr if echo else None), daemon=True)]
    for t in pumps:
        t.start()
    try:
        code = proc.wait()
        for t in pumps:
            t.join()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code, "".join(out), "".join(err), bool(stopped)


def outcome(returncode: int, stdout: str) -> tuple[str, str | None]:
    """(status, run_id) from the trainer's exit code and its closing line."""
    m = _RESULT.search(stdout)
    return (m.group(2), m.group(1)) if returncode == 0 and m else ("failed", None)


_ASK = CellState(attempts=-1, done=False, running=False, run_id=None)  # "read the store for it"


def run_cell(manifest: Manifest, index: int, *, job_id: str | None = None, echo: bool = True,
             state: CellState | None = _ASK) -> CellResult:
    """Run cell `index` of `manifest` as its next attempt, unless the store says it is done or alive.

    `state` is what the store says about the cell when the caller has just read it (None: nothing);
    by default the task reads it itself, as a task that waited in a queue must.
    """
    cell: Cell = manifest.cells[index]
    if state is _ASK:
        state = cell_states(manifest.db, manifest.sweep).get(cell.cell_id)
    if state and (state.done or state.running):
        status = "skipped" if state.done else "running"
        if echo:
            print(f"cell {cell.cell_id}: {'already done' if state.done else 'running elsewhere'} "
                  f"(run {state.run_id}, {state.attempts} attempt(s)); nothing to do", flush=True)
        return CellResult(cell.cell_id, cell.name, status, state.attempts, state.run_id, 0, 0.0)
    attempt = (state.attempts if state else 0) + 1
    cmd = cell_command(manifest, cell)
    t0 = time.perf_counter()
    for tried in range(1 + manifest.retries):
        attempt += tried > 0
        if echo:
            print(f"cell {cell.cell_id} attempt {attempt}" + (f" (job {job_id})" if job_id else "")
                  + f": {' '.join(cmd)}", flush=True)
        code, out, err, stopped = run_process(cmd, cell_env(manifest, cell, attempt, job_id), manifest.cwd, echo)
        status, run_id = outcome(code, out)
        if status != "failed" or stopped or not retryable(code):  # a stopped task is not retried at once
            break
    error = None
    if status == "failed":
        error = f"exit code {code}: " + (err.strip().splitlines() or ["(no output)"])[-1]
    return CellResult(cell.cell_id, cell.name, status, attempt, run_id, code, time.perf_counter() - t0, error)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.launchers.cell",
                                description="Run one cell of a launched sweep (what each cluster task runs).")
    p.add_argument("manifest", help="the launch manifest (JSON) written by python -m trainer sweep")
    p.add_argument("index", nargs="?", type=int, help="cell index in it (default: $SLURM_ARRAY_TASK_ID)")
    args = p.parse_args(argv)
    index = args.index if args.index is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
    if index is None:
        p.error("give INDEX or run it as a SLURM array task")
    import collector

    try:
        result = run_cell(read_manifest(args.manifest), int(index))
    except collector.StoreError as exc:
        print(f"cell {index} of {args.manifest}: cannot read which cells are done: {exc}", file=sys.stderr)
        return 1
    if result.error:
        print(f"cell {result.cell_id} failed: {result.error}", file=sys.stderr)
    return 1 if result.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
