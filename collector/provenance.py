"""Where a run ran: rank, launcher, job ids, sweep cell and attempt, and the training code's git commit.

Read once at `start_run` from the environment the launchers already set (torchrun: RANK/WORLD_SIZE;
SLURM: SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID; batchscope's sweep launchers:
BATCHSCOPE_CELL_ID, BATCHSCOPE_ATTEMPT, BATCHSCOPE_LAUNCHER, BATCHSCOPE_JOB_ID), so any training loop
gets them without passing anything. Every field is optional: a missing variable or a missing `git`
leaves that column NULL and never fails the run. Explicit `start_run(...)` arguments win.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

GIT_TIMEOUT = 2.0  # seconds; a huge or network-mounted repo must not hold up the start of a run


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


def from_environ(env: Mapping[str, str]) -> dict:
    """The provenance fields the environment states (pure: no I/O); absent ones are left out."""
    out: dict = {}
    rank = _int(env.get("RANK"))
    if rank is not None:
        out["rank"] = rank
    world = _int(env.get("WORLD_SIZE"))
    if world is not None:
        out["world_size"] = world
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), _int(env.get("SLURM_ARRAY_TASK_ID"))
    if array_job:
        out["array_job_id"] = array_job
    if array_task is not None:
        out["array_task_id"] = array_task
    job = env.get("BATCHSCOPE_JOB_ID") or env.get("SLURM_JOB_ID")
    if job:
        out["job_id"] = job
    launcher = env.get("BATCHSCOPE_LAUNCHER") or ("slurm" if env.get("SLURM_JOB_ID") else None)
    if launcher:
        out["launcher"] = launcher
    if env.get("BATCHSCOPE_CELL_ID"):
        out["cell_id"] = env["BATCHSCOPE_CELL_ID"]
    attempt = _int(env.get("BATCHSCOPE_ATTEMPT"))
    if attempt is not None:
        out["attempt"] = attempt
    if env.get("BATCHSCOPE_GIT_COMMIT"):
        out["git_commit"] = env["BATCHSCOPE_GIT_COMMIT"]
    return out


def code_dir() -> Path:
    """The folder of the program being run (`python -m trainer`: the trainer package), else the cwd."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return Path(main).resolve().parent if main else Path.cwd()


def git_commit(folder: Path) -> str | None:
    """HEAD of the git repository holding `folder`, with '-dirty' when tracked files have uncommitted
    changes (git describe's convention); None without git, outside a repository, or on a timeout."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    head = git("rev-parse", "--verify", "HEAD")
    if not head:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if status else "")


@functools.lru_cache(maxsize=8)
def _git_commit_once(folder: Path) -> str | None:
    """git_commit, asked once per process and folder: a process that starts many runs (a test suite, a
    notebook) pays for the two git calls (5-25 ms) once."""
    return git_commit(folder)


def provenance(env: Mapping[str, str] | None = None, folder: Path | None = None) -> dict:
    """Provenance fields for a new run: the environment's, plus the git commit unless the env gave one.

    Only values their columns can store are kept (an odd variable is dropped, never an error)."""
    from collector.values import run_fields

    out = from_environ(os.environ if env is None else env)
    if "git_commit" not in out:
        commit = _git_commit_once(folder or code_dir())
        if commit:
            out["git_commit"] = commit
    out.setdefault("rank", 0)  # a run started without a distributed launcher is rank 0 of its world
    kept = {}
    for k, v in out.items():
        try:
            kept |= run_fields({k: v})
        except (TypeError, ValueError):
            continue
    return kept
