"""Regenerate sample_runs/charlm/: a real charlm AdamW batch x LR sweep made by our trainer, as Parquet.

    python sample_runs/charlm/make_charlm_runs.py     # ~10 min of CPU on 2 cores (2 jobs)

A byte-level GPT (context 32, 2 layers, width 64: small enough for a CPU) on Python's stdlib sources,
AdamW (weight decay 0.1, warm-up + cosine), 4 batch sizes x 4 learning rates, one seed, the
noise-scale ingredients on every step (plain) and every 10th step (Adam-preconditioned), curvature at
every evaluation. Every run trains *to a target* (--target-loss 2.2 nats/char, about 0.7 x the
unigram entropy) under one cap of 1,500 steps for every batch size, so the budget does not decide which
batches reach it. Load it like the digits sample: `python -m collector import sample_runs/charlm/`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEP = "charlm-sample"
MODEL = ["--task", "charlm", "--context", "32", "--layers", "2", "--width", "64"]
OPTIM = ["--optimizer", "adamw", "--weight-decay", "0.1", "--lr-schedule", "warmup-cosine", "--warmup", "0.02"]
BUDGET = ["--steps", "1500", "--target-loss", "2.2", "--eval-every", "50", "--curvature"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "sample.duckdb")
        subprocess.run([sys.executable, "-m", "trainer", "sweep", "--batch", "16,32,64,128", "--lr", "0.001:0.01:4",
                        *MODEL, *OPTIM, *BUDGET, "--sweep", SWEEP, "--db", db, "--jobs", "2", "--threads", "1",
                        "--no-progress"], check=True)
        # export overwrites one <table>.parquet at a time, in place
        subprocess.run([sys.executable, "-m", "collector", "export", "--db", db, str(HERE)], check=True)
    print(f"sample runs written to {HERE}")


if __name__ == "__main__":
    main()
