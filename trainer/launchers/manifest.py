"""A sweep's cells and the launch manifest every launcher hands to its tasks.

A cell is one (batch, LR, seed) point of the grid, named by `cell_id` (e.g. b64-lr0.1-s0), which stays
the same across launches and retries: it is how a re-launch knows what is done and how retries become
attempts of one cell. Each launch writes its own manifest (JSON, never rewritten) under the sweep's
folder, so a queued SLURM array task still reads the cells it was submitted with, whatever a later
launch writes. A task needs only the manifest path and its index: `python -m trainer.launchers.cell
MANIFEST INDEX`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path


class SweepError(ValueError):
    """Bad sweep input or state, reported as one line with exit code 2."""


@dataclass(frozen=True)
class Cell:
    """One point of the grid and the trainer's own command line for it (without `python -m trainer`)."""

    cell_id: str
    name: str
    batch: int
    lr: float
    seed: int
    argv: tuple[str, ...]


@dataclass
class Manifest:
    """What one launch runs, and how: everything a task on another machine needs besides the code."""

    sweep: str
    db: str
    launcher: str
    cells: list[Cell]
    python: str = sys.executable
    cwd: str = field(default_factory=os.getcwd)
    threads: int = 1  # torch threads per process (per rank for DDP cells)
    nproc_per_node: int = 1  # > 1: the cell runs under torchrun with this many ranks
    retries: int = 0  # failed attempts re-run at once by the task itself (each a new attempt)
    created_at: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))


def cell_id(batch: int, lr: float, seed: int) -> str:
    return f"b{batch}-lr{lr:g}-s{seed}"


def make_cells(common: list[str], batches: list[int], lrs: list[float], seeds: list[int], *, sweep: str,
               db: str, threads: int) -> list[Cell]:
    """Every (batch, LR, seed) cell; run names keep the seed only when the grid has several."""
    cells = []
    for b in batches:
        for lr in lrs:
            for s in seeds:
                name = f"b{b}-lr{lr:g}" + (f"-s{s}" if len(seeds) > 1 else "")
                argv = (*common, "--batch", str(b), "--lr", f"{lr:g}", "--seed", str(s), "--sweep", sweep,
                        "--db", db, "--name", name, "--threads", str(threads), "--no-progress")
                cells.append(Cell(cell_id(b, lr, s), name, b, lr, s, argv))
    return cells


def cell_command(m: Manifest, cell: Cell) -> list[str]:
    """The process a task starts for its cell: the trainer, under torchrun when the cell is DDP.

    torchrun runs as `python -m torch.distributed.run` of the same interpreter (no PATH lookup), with a
    standalone rendezvous on a free local port, so several DDP cells can share a node.
    """
    if m.nproc_per_node > 1:
        return [m.python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(m.nproc_per_node), "-m", "trainer", *cell.argv]
    return [m.python, "-m", "trainer", *cell.argv]


def cell_env(m: Manifest, cell: Cell, attempt: int, job_id: str | None, base: dict | None = None) -> dict:
    """The cell process's environment: thread caps, and the provenance the collector records."""
    env = dict(os.environ if base is None else base)
    env |= {"OMP_NUM_THREADS": str(m.threads), "MKL_NUM_THREADS": str(m.threads),
            "BATCHSCOPE_LAUNCHER": m.launcher, "BATCHSCOPE_CELL_ID": cell.cell_id,
            "BATCHSCOPE_ATTEMPT": str(attempt)}
    if job_id:
        env["BATCHSCOPE_JOB_ID"] = job_id
    return env


def sweep_dir(db: str | Path, sweep: str) -> Path:
    """Where a sweep's manifests, scripts and logs live: next to the store (so cluster nodes see it too)."""
    db = Path(db)
    return db.with_name(db.name + ".sweeps") / sweep


def write_manifest(m: Manifest, folder: Path) -> Path:
    """Write a new, never rewritten manifest for this launch (atomically) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"launch-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    tmp = folder / f".{stamp}.tmp"
    tmp.write_text(json.dumps(asdict(m), indent=1))
    for n in range(1000):
        path = folder / (f"{stamp}.json" if n == 0 else f"{stamp}-{n}.json")
        try:
            os.link(tmp, path)  # fails if the name is taken: a manifest is never replaced
        except FileExistsError:
            continue
        tmp.unlink()
        return path
    raise SweepError(f"cannot find a free manifest name in {folder}")


def read_manifest(path: str | Path) -> Manifest:
    data = json.loads(Path(path).read_text())
    data["cells"] = [Cell(**(c | {"argv": tuple(c["argv"])})) for c in data["cells"]]
    return Manifest(**data)


def check_same_options(folder: Path, options: dict) -> None:
    """A sweep resumed under its name must train with the options it started with (else its cells are
    not comparable); the first launch records them in sweep.json."""
    record = folder / "sweep.json"
    if not record.exists():
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(options, indent=1, sort_keys=True, default=str))
        return
    before = json.loads(record.read_text())
    now = json.loads(json.dumps(options, default=str))
    diff = [f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)]
    if diff:
        raise SweepError(f"sweep {folder.name!r} was started with other options ({'; '.join(diff)}); "
                         "re-launch it with the same options to resume it, or give a new --sweep name")
