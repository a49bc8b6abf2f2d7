"""Regenerate sample_runs/: a real digits batch x LR sweep made by our trainer, stored as Parquet.

    python sample_runs/make_sample_runs.py            # ~20 min on 2 cores (2 jobs)

Why this budget: every run trains *to a target* (--target-loss, the trainer stops once its smoothed
training loss gets there) under one cap on *steps* for every batch size, not one on epochs. Large batches
need few steps, so with a budget in epochs (the first sample sweep: 30 epochs, ~40 steps at B = 1024)
they never reached the lower targets, and the tradeoff, B_crit-vs-loss and generalization pages drew
the budget, not the batch size. Now the largest batch reaches the lowest target the pages offer by
default (tests/test_dashboard_browser.py checks it), two seeds give intervals, and evaluations every
a fixed fraction of a run on fixed data give crossings on eval loss and the matched-training-loss gap.

The dashboard offers these runs on an empty store; tests use them. Parquet (one file per table) outlives
DuckDB file-format changes; `python -m collector import sample_runs/` loads them into any store.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb

HERE = Path(__file__).resolve().parent
SWEEP = "digits-sample"
SEEDS = (0, 1)
LRS = "0.03:3:5"
# one cap in steps for every batch size, and stop at the target (the trainer's smoothed training loss)
BUDGET = ["--steps", "1500", "--target-loss", "0.05"]  # the noise ingredients: every step (the default)
# evaluations about 40 times over a run that reaches the target: small batches need more steps
EVAL_EVERY = {8: 40, 16: 35, 32: 30, 64: 25, 128: 20, 256: 15, 512: 10, 1024: 8}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "sample.duckdb")
        for seed in SEEDS:
            for batch, every in EVAL_EVERY.items():
                # a sweep keeps one set of options, so each (seed, batch) part is its own sweep until the rename
                subprocess.run([sys.executable, "-m", "trainer", "sweep", "--batch", str(batch), "--lr", LRS, *BUDGET,
                                "--eval-every", str(every), "--seed", str(seed), "--sweep", f"{SWEEP}-{seed}-{batch}",
                                "--db", db, "--jobs", "2", "--threads", "1", "--no-progress"], check=True)
        con = duckdb.connect(db)
        try:
            con.execute("UPDATE runs SET sweep = ? WHERE sweep LIKE ?", [SWEEP, f"{SWEEP}-%"])
        finally:
            con.close()
        # export overwrites one <table>.parquet at a time, in place
        subprocess.run([sys.executable, "-m", "collector", "export", "--db", db, str(HERE)], check=True)
    print(f"sample runs written to {HERE}")


if __name__ == "__main__":
    main()
