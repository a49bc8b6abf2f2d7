"""`--launcher slurm`: one sbatch job array, one array task per cell of the launch manifest.

The script is written next to the manifest (so it can be read, edited and resubmitted by hand) and
submitted with `sbatch --parsable`; the command returns once SLURM has the array, not when it ends.
Each task runs `python -m trainer.launchers.cell MANIFEST $SLURM_ARRAY_TASK_ID`. `--requeue` lets SLURM
requeue a preempted task, which then resumes as the cell's next attempt; `--open-mode=append` keeps
every attempt's output in the task's log.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from trainer.launchers.manifest import Manifest, SweepError


@dataclass(frozen=True)
class SlurmOptions:
    """What the sbatch script asks for; None leaves it to the cluster's defaults."""

    partition: str | None = None
    time: str | None = None  # SLURM's forms: MM, HH:MM:SS, D-HH:MM
    gpus: int | None = None  # per cell (an array task)
    cpus: int | None = None  # per cell; default: threads x ranks
    mem: str | None = None  # e.g. 16G
    max_parallel: int | None = None  # array throttle: at most this many tasks at once
    extra: tuple[str, ...] = field(default_factory=tuple)  # more sbatch options, passed through as given


def sbatch_script(m: Manifest, manifest_path: Path, opts: SlurmOptions, log_dir: Path) -> str:
    """The job-array script for the manifest's cells (pure: no I/O)."""
    n = len(m.cells)
    array = f"0-{n - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else "")
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=batchscope-{m.sweep}",
             f"#SBATCH --array={array}",
             f"#SBATCH --output={log_dir}/%A_%a.out",
             "#SBATCH --open-mode=append",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={opts.cpus or m.threads * m.nproc_per_node}",
             "#SBATCH --requeue"]
    for flag, value in (("partition", opts.partition), ("time", opts.time), ("gpus", opts.gpus), ("mem", opts.mem)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {shlex.quote(a) if ' ' in a else a}" for a in opts.extra]
    lines += ["",
              f"# batchscope sweep {m.sweep}: {n} cell(s); the cell of task i is cells[i] of the manifest.",
              f"cd {shlex.quote(m.cwd)}",
              f"exec {shlex.quote(m.python)} -m trainer.launchers.cell {shlex.quote(str(manifest_path))} "
              '"$SLURM_ARRAY_TASK_ID"', ""]
    return "\n".join(lines)


def sbatch_command(explicit: str | None) -> str:
    """sbatch to call: --sbatch, else $BATCHSCOPE_SBATCH, else `sbatch` on PATH."""
    cmd = explicit or os.environ.get("BATCHSCOPE_SBATCH") or "sbatch"
    if shutil.which(cmd) is None:
        raise SweepError(f"--launcher slurm: {cmd!r} not found; run this on a SLURM login node, or point "
                         "--sbatch (or $BATCHSCOPE_SBATCH) at sbatch")
    return cmd


def launch(m: Manifest, manifest_path: Path, opts: SlurmOptions, sbatch: str | None = None) -> str:
    """Write the script and submit it; returns SLURM's job id of the array."""
    cmd = sbatch_command(sbatch)
    log_dir = manifest_path.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    script = manifest_path.with_suffix(".sbatch")
    script.write_text(sbatch_script(m, manifest_path, opts, log_dir))
    proc = subprocess.run([cmd, "--parsable", str(script)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise SweepError(f"sbatch refused the job array ({script}): {last}")
    job = proc.stdout.strip().splitlines()[-1].split(";")[0] if proc.stdout.strip() else "?"
    print(f"submitted job array {job}: {len(m.cells)} task(s), script {script}", flush=True)
    print(f"follow it:  squeue -j {job}    logs: {log_dir}/{job}_<task>.out", flush=True)
    return job
