"""`--launcher local`: the cells as processes on this machine, --jobs at a time (the default)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

from trainer.launchers.cell import CellResult, CellState, run_cell
from trainer.launchers.manifest import Manifest


def launch(manifest: Manifest, jobs: int, states: dict[str, CellState]) -> Iterator[CellResult]:
    """Run every cell of the manifest, yielding results as they complete.

    The driver has just read the store (`states`), so tasks take their attempt numbers from it instead
    of each reading it again.
    """
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_cell, manifest, i, echo=False, state=states.get(c.cell_id))
                   for i, c in enumerate(manifest.cells)]
        for fut in as_completed(futures):
            yield fut.result()
