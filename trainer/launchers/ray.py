"""`--launcher ray`: the cells as Ray tasks, each asking for its CPUs (and GPUs).

Connects to --ray-address (e.g. auto, on a node of a running cluster), else starts a local Ray. A task
runs the cell through trainer/launchers/cell.py, so the worker machine needs the code and the store's
folder (a shared filesystem). Ray re-runs a task whose worker or node died (its default of 3 retries),
and the re-run resumes as the cell's next attempt. Needs `pip install 'batchscope[ray]'`.
"""

from __future__ import annotations

from collections.abc import Iterator

import ray

from trainer.launchers.cell import CellResult, run_cell
from trainer.launchers.manifest import Manifest


def _cell_task(manifest: Manifest, index: int) -> CellResult:
    return run_cell(manifest, index, job_id=ray.get_runtime_context().get_task_id())


def launch(m: Manifest, cpus: int | None = None, gpus: float | None = None,
           address: str | None = None) -> Iterator[CellResult]:
    """Run every cell of the manifest as a Ray task and yield results as they complete."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=cpus or m.threads * m.nproc_per_node, num_gpus=gpus or 0)(_cell_task)
        pending = {task.remote(m, i): i for i in range(len(m.cells))}
        print(f"submitted {len(pending)} Ray task(s) to {ray.get_runtime_context().gcs_address}", flush=True)
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            cell = m.cells[pending.pop(done)]
            try:
                yield ray.get(done)
            except ray.exceptions.RayError as exc:  # the worker died past its retries, or the task was cancelled
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                yield CellResult(cell.cell_id, cell.name, "failed", None, None, 1, 0.0, f"ray: {lines[-1]}")
    finally:
        if started:
            ray.shutdown()
