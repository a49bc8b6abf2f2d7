"""`--launcher submitit`: the cells as a submitit job array (SLURM, or its local executor).

Each job runs the cell through trainer/launchers/cell.py with submitit's job id. The job function is
Checkpointable: when SLURM preempts a job or its time runs out, submitit requeues it and the requeued
job resumes as the cell's next attempt (the store says which). Needs `pip install 'batchscope[submitit]'`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import submitit

from trainer.launchers.cell import CellResult, run_cell
from trainer.launchers.manifest import Manifest
from trainer.launchers.slurm import SlurmOptions


class CellJob(submitit.helpers.Checkpointable):
    """The picklable job: run one cell as its next attempt (checkpoint() resubmits the same call)."""

    def __call__(self, manifest: Manifest, index: int) -> CellResult:
        return run_cell(manifest, index, job_id=str(submitit.JobEnvironment().job_id))


def minutes(time: str | None) -> int | None:
    """SLURM's time forms (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes."""
    if not time:
        return None
    days, _, rest = time.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return max(1, (int(days or 0) * 24 + h) * 60 + m + (s > 0))


def executor(folder: Path, m: Manifest, opts: SlurmOptions, cluster: str | None) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict = {"name": f"batchscope-{m.sweep}", "nodes": 1, "tasks_per_node": 1,
                    "cpus_per_task": opts.cpus or m.threads * m.nproc_per_node}
    if opts.time:
        params["timeout_min"] = minutes(opts.time)
    if opts.gpus:
        params["gpus_per_node"] = opts.gpus
    if opts.mem:
        params["slurm_mem"] = opts.mem
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.max_parallel:
        params["slurm_array_parallelism"] = opts.max_parallel
    ex.update_parameters(**params)
    return ex


def launch(m: Manifest, folder: Path, opts: SlurmOptions, cluster: str | None = None) -> Iterator[CellResult]:
    """Submit every cell of the manifest as one job array and yield results as jobs end."""
    ex = executor(folder, m, opts, cluster)
    n = len(m.cells)
    jobs = ex.map_array(CellJob(), [m] * n, list(range(n)))
    print(f"submitted {n} submitit job(s) to {ex.cluster} (job {jobs[0].job_id.split('_')[0]}); "
          f"their logs: {folder}", flush=True)
    for job in submitit.helpers.as_completed(jobs):
        cell = m.cells[jobs.index(job)]
        try:
            yield job.result()
        except Exception as exc:  # noqa: BLE001 - the job died outside the cell (killed, lost node): a failed cell
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            yield CellResult(cell.cell_id, cell.name, "failed", None, None, 1, 0.0, f"job {job.job_id}: {lines[-1]}")
