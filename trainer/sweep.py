"""`python -m trainer sweep`: a batch-size x learning-rate grid, one subprocess per run, N at a time.

Separate processes (not threads) so a diverging or crashing run cannot take the others down, and each
gets its share of the cores (torch threads = cores / jobs). Every run is written by its own process
through the collector (which serialises the store writes), under one sweep name.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime

from trainer.cli import OneLineParser, add_train_options

USAGE_EXAMPLES = """\
examples:
  python -m trainer sweep --batch 8,16,32,64,128,256,512,1024 --lr 0.003:1:8 --jobs 2
  python -m trainer sweep --batch 8:1024 --lr 0.01,0.1,1 --target-loss 0.1 --sweep digits-target
  python -m trainer sweep --task teacher --batch 16:512 --lr 0.01:1:5 --examples 300000

--batch A,B,C lists batch sizes; A:B doubles from A up to B. --lr LO:HI:N is N log-spaced rates from LO
to HI (inclusive); a comma list is taken as is. Each run is named bB-lrLR. Diverged runs are data (the
LR x batch stability map), not failures.
"""


def parse_batches(text: str) -> list[int]:
    """'8,16,32' or '8:1024' (doubling)."""
    try:
        if ":" in text:
            lo, hi = (int(v) for v in text.split(":"))
            if lo <= 0 or hi < lo:
                raise ValueError
            out = []
            while lo <= hi:
                out.append(lo)
                lo *= 2
            return out
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 8,16,32 or 8:1024, got {text!r}") from None


def parse_lrs(text: str) -> list[float]:
    """'LO:HI:N' (N log-spaced values, inclusive) or a comma list."""
    try:
        if ":" in text:
            lo_s, hi_s, n_s = text.split(":")
            lo, hi, n = float(lo_s), float(hi_s), int(n_s)
            if not (lo > 0 and hi >= lo and n >= 1):
                raise ValueError
            if n == 1:
                return [lo]
            step = (math.log(hi) - math.log(lo)) / (n - 1)
            return [float(f"{math.exp(math.log(lo) + i * step):.4g}") for i in range(n)]
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected learning rates like 0.003:1:8 or 0.01,0.1, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m trainer sweep", description="Run a batch-size x learning-rate grid.",
                      epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = p.add_argument_group("the grid")
    grid.add_argument("--batch", type=parse_batches, required=True, help="batch sizes: 8,16,32 or 8:1024")
    grid.add_argument("--lr", type=parse_lrs, required=True, help="learning rates: LO:HI:N (log-spaced) or a,b,c")
    grid.add_argument("--jobs", type=int, default=None, help="runs at once (default: one per core)")
    grid.add_argument("--sweep", help="sweep name (default: TASK-YYYYmmdd-HHMMSS)")
    add_train_options(p, sweep=True)
    return p


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def child_args(argv: list[str], batch: int, lr: float, sweep: str, db: str, threads: int) -> list[str]:
    """The run's own command line: the user's options minus the grid ones, plus this cell of the grid."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in ("--batch", "--lr", "--jobs", "--sweep", "--db", "--threads"):
            skip = "=" not in a
            continue
        rest.append(a)
    return [*rest, "--batch", str(batch), "--lr", f"{lr:g}", "--sweep", sweep, "--db", db,
            "--name", f"b{batch}-lr{lr:g}", "--threads", str(threads), "--no-progress"]


def main(argv: list[str]) -> int:
    """Validate the whole grid first (exit 2 on bad input), then run it."""
    import collector
    from trainer.cli import build_parser as train_parser
    from trainer.cli import config_from_args, prepare
    from trainer.config import ConfigError, validate
    from trainer.datasets import DataError

    args = build_parser().parse_args(argv)
    jobs = args.jobs or cpu_count()
    if jobs <= 0:
        print("python -m trainer sweep: error: --jobs must be positive", file=sys.stderr)
        return 2
    threads = max(1, cpu_count() // jobs)
    sweep = args.sweep or f"{args.task}-{datetime.now():%Y%m%d-%H%M%S}"
    db = str(collector.resolve_db(args.db).resolve())
    cells = [(b, lr) for b in args.batch for lr in args.lr]
    commands = [child_args(argv, b, lr, sweep, db, threads) for b, lr in cells]
    try:
        for i, cmd in enumerate(commands):
            cfg = config_from_args(train_parser().parse_args(cmd))
            validate(cfg)
            if i == 0:
                prepare(cfg)  # loads the data once: a missing --data-dir file fails here, not 40 times
    except (ConfigError, DataError, ValueError, OSError) as exc:
        print(f"python -m trainer sweep: error: {exc}", file=sys.stderr)
        return 2

    print(f"sweep {sweep}: {len(cells)} runs ({len(args.batch)} batch sizes x {len(args.lr)} learning rates), "
          f"{jobs} at a time with {threads} thread(s) each -> {db}", flush=True)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    statuses: dict[str, int] = {}

    def launch(cmd: list[str]) -> tuple[list[str], subprocess.CompletedProcess, float]:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "trainer", *cmd], capture_output=True, text=True, env=env)
        return cmd, proc, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(launch, cmd) for cmd in commands]
        for done, fut in enumerate(as_completed(futures), 1):
            cmd, proc, secs = fut.result()
            name = cmd[cmd.index("--name") + 1]
            m = re.search(r"^run (\w{12}) (finished|diverged)", proc.stdout, re.M)
            status = m.group(2) if proc.returncode == 0 and m else "failed"
            statuses[status] = statuses.get(status, 0) + 1
            print(f"[{done:>{len(str(len(cells)))}}/{len(cells)}] {name:<22} {status:<9} "
                  f"{'run ' + m.group(1) if m else ''} ({secs:.1f} s)", flush=True)
            if status == "failed":
                last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"    exit code {proc.returncode}: {last}", flush=True)

    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    print(f"sweep {sweep} done in {time.perf_counter() - t0:.0f} s: {summary}")
    print(f"look at it:  python -m dashboard --db {db}")
    print(f"or:          python -m collector runs --sweep {sweep} --db {db}")
    return 1 if statuses.get("failed") else 0
