"""Suite-wide hooks.

DuckDB's Python bindings (nanobind) print "nanobind: leaked N instances" at interpreter exit when
DuckDB objects are still referenced by module globals of other libraries; it is shutdown noise, not
a failure, but after pytest's summary line it reads like one. The suite therefore ends the process
right after pytest has finished reporting, with pytest's own exit status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_exit_status: int | None = None


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> Callable[[Path, tuple[str, ...]], Path]:
    """`sample_store(dest, ("sample_runs", "sample_runs/charlm"))`: a store at `dest` holding the shipped
    sample sweeps, imported by `python -m collector import` as users do. Each set of folders is imported
    once per session and copied (one DuckDB file) to every module that asks, so each still owns its store
    and may write to it; five modules asked for eight imports of the same few folders."""
    cache: dict[tuple[str, ...], Path] = {}
    root = tmp_path_factory.mktemp("sample-stores")

    def make(dest: Path, folders: tuple[str, ...]) -> Path:
        for n in range(1, len(folders) + 1):  # digits + charlm: the digits store (kept too), then charlm into a copy
            key = folders[:n]
            if key in cache:
                continue
            db = root / f"{len(cache)}.duckdb"
            if n > 1:
                _copy(cache[folders[:n - 1]], db)
            subprocess.run([sys.executable, "-m", "collector", "import", str(ROOT / folders[n - 1]), "--db", str(db)],
                           cwd=ROOT, check=True, capture_output=True, timeout=300)
            cache[key] = db
        return _copy(cache[folders], dest)

    return make


def _copy(db: Path, dest: Path) -> Path:
    """A closed store is its one file (plus a WAL only if a process died holding it)."""
    shutil.copyfile(db, dest)
    wal = db.with_name(db.name + ".wal")
    if wal.exists():
        shutil.copyfile(wal, dest.with_name(dest.name + ".wal"))
    return dest


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config) -> None:
    # Only for a whole run from the command line (not pytest.main() inside another program).
    if _exit_status is None or os.environ.get("BATCHSCOPE_KEEP_INTERPRETER") == "1":
        return
    if getattr(config, "workerinput", None) is not None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
