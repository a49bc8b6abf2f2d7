"""Regenerate sample_runs/: a real digits batch x LR sweep made by our trainer, stored as Parquet.

    python sample_runs/make_sample_runs.py            # a few minutes on 2 cores

The dashboard offers these runs on an empty store; tests use them. Parquet (one file per table) outlives
DuckDB file-format changes; `python -m collector import sample_runs/` loads them into any store.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEP = ["--batch", "8:1024", "--lr", "0.01:3:8", "--epochs", "30", "--seed", "0", "--sweep", "digits-sample"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "sample.duckdb")
        subprocess.run([sys.executable, "-m", "trainer", "sweep", *SWEEP, "--db", db, "--jobs", "2"], check=True)
        out = Path(tmp) / "export"
        subprocess.run([sys.executable, "-m", "collector", "export", "--db", db, str(out)], check=True)
        for f in out.glob("*.parquet"):
            shutil.copy(f, HERE / f.name)
    print(f"sample runs written to {HERE}")


if __name__ == "__main__":
    main()
