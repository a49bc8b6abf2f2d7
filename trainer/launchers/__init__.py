"""Sweep launchers: where the cells of `python -m trainer sweep` run.

local runs them as processes on this machine (N at a time); slurm submits a job array; submitit and
ray hand them to those engines. Every launcher runs each cell through trainer/launchers/cell.py, which
skips cells the store already has and records retries as attempts, so any launch of a sweep resumes it.
The heavy engines are optional extras, imported only when chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from trainer.launchers.cell import CellResult

LAUNCHERS = ("local", "slurm", "submitit", "ray")
EXTRAS = {"submitit": "submitit", "ray": "ray"}  # launcher -> the pip extra (and module) it needs


class LauncherUnavailable(RuntimeError):
    """The chosen launcher's engine is not installed: one line naming the extra to install."""


def load(name: str):
    """The launcher module `trainer.launchers.<name>`; LauncherUnavailable if its engine is missing."""
    if name not in LAUNCHERS:
        raise ValueError(f"unknown launcher {name!r}; choose one of {', '.join(LAUNCHERS)}")
    try:
        return importlib.import_module(f"trainer.launchers.{name}")
    except ImportError as exc:
        extra = EXTRAS.get(name)
        if extra is None or (exc.name or "").split(".")[0] != extra:
            raise
        raise LauncherUnavailable(f"--launcher {name} needs {extra}, which is not installed: "
                                  f"pip install 'batchscope[{extra}]'") from None


def report(results: Iterable[CellResult], total: int) -> dict[str, int]:
    """Print one line per cell as it completes (and the last error line of a failed one); count statuses."""
    width = len(str(total))
    counts: dict[str, int] = {}
    for done, r in enumerate(results, 1):
        counts[r.status] = counts.get(r.status, 0) + 1
        attempt = f" attempt {r.attempt}" if r.attempt and r.attempt > 1 else ""
        run = f"run {r.run_id}" if r.run_id else ""
        print(f"[{done:>{width}}/{total}] {r.name:<22} {r.status:<9} {run}{attempt} ({r.seconds:.1f} s)", flush=True)
        if r.error:
            print(f"    {r.error}", flush=True)
    return counts
