"""`python -m trainer sweep`: a batch-size x learning-rate (x seed) grid, run where --launcher says.

Each (batch, LR, seed) cell is one run in its own process (a diverging or crashing run cannot take the
others down), written through the collector under one sweep name, with its cell id and attempt number.
--launcher local (the default) runs N processes at a time on this machine; slurm submits a job array;
submitit and ray hand the cells to those engines (trainer/launchers/). Every launch first asks the store
which cells are done, so re-launching a sweep under its name runs only the missing cells, and a retried
cell is the next attempt of the same cell (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from trainer.cli import OneLineParser, add_train_options

USAGE_EXAMPLES = """\
examples:
  python -m trainer sweep --batch 8,16,32,64,128,256,512,1024 --lr 0.003:1:8 --jobs 2
  python -m trainer sweep --batch 8:1024 --lr 0.01,0.1,1 --target-loss 0.1 --sweep digits-target
  python -m trainer sweep --task teacher --batch 16:512 --lr 0.01:1:5 --examples 300000
  python -m trainer sweep --batch 16:512 --lr 0.01:1:5 --seed 0,1,2 --sweep grid --launcher slurm \\
      --partition gpu --time 2:00:00 --gpus 1 --cpus 8 --device cuda --db /shared/runs.duckdb
  python -m trainer sweep ... --launcher submitit | --launcher ray --ray-address auto
  python -m trainer sweep ... --nproc-per-node 4 --gpus 4     every cell a 4-rank DDP run (torchrun)

--batch A,B,C lists batch sizes; A:B doubles from A up to B. --lr LO:HI:N is N log-spaced rates from LO
to HI (inclusive); a comma list is taken as is. Each run is named bB-lrLR (-sSEED with several seeds).
Diverged runs are data (the LR x batch stability map), not failures. Re-run the same command with the
same --sweep to resume a sweep: only cells with no finished or diverged run are launched again.
"""
# Sweep options with a value (the rest of the command line is the runs' own options).
SWEEP_OPTIONS = ("--batch", "--lr", "--seed", "--jobs", "--sweep", "--db", "--threads", "--launcher",
                 "--sweep-dir", "--nproc-per-node", "--retries", "--partition", "--time", "--gpus", "--cpus",
                 "--mem", "--max-parallel", "--sbatch", "--sbatch-arg", "--submitit-cluster", "--ray-address")
GRID_KEYS = ("batch", "lr", "seed", "name", "sweep", "db", "threads")  # what differs between a sweep's runs


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


def parse_seeds(text: str) -> list[int]:
    """'0' or '0,1,2'."""
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integer seeds like 0 or 0,1,2, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: every sweep option is removed from the runs' own command lines by its full name
    p = OneLineParser(prog="python -m trainer sweep", description="Run a batch-size x learning-rate grid.",
                      epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False)
    grid = p.add_argument_group("the grid")
    grid.add_argument("--batch", type=parse_batches, required=True, help="batch sizes: 8,16,32 or 8:1024")
    grid.add_argument("--lr", type=parse_lrs, required=True, help="learning rates: LO:HI:N (log-spaced) or a,b,c")
    grid.add_argument("--seed", type=parse_seeds, default=[0], help="seeds: 0 (default) or 0,1,2 (one run per seed)")
    grid.add_argument("--jobs", type=int, default=None, help="runs at once with --launcher local (default: one per core)")
    grid.add_argument("--sweep", help="sweep name (default: TASK-YYYYmmdd-HHMMSS); re-launch with the same name to "
                                      "resume: cells already finished or diverged are skipped")
    add_launcher_options(p)
    add_train_options(p, sweep=True)
    return p


def add_launcher_options(p: argparse.ArgumentParser) -> None:
    from trainer.launchers import LAUNCHERS

    where = p.add_argument_group("where the cells run (docs/cluster.md)")
    where.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local (default): processes on this machine; slurm: an sbatch job array; "
                            "submitit: its executors; ray: Ray tasks")
    where.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                       help="ranks per cell: N > 1 runs each cell under torchrun (DDP) with N processes")
    where.add_argument("--retries", type=int, default=0, metavar="N",
                       help="re-run a failed cell at once up to N times, each a new attempt (default 0)")
    where.add_argument("--sweep-dir", metavar="DIR",
                       help="manifests, scripts and logs (default: <db>.sweeps/<sweep>/, next to the store)")
    res = p.add_argument_group("cluster resources, per cell (slurm, submitit; ray takes --cpus and --gpus)")
    res.add_argument("--partition", help="SLURM partition")
    res.add_argument("--time", metavar="T", help="time limit per cell, e.g. 90, 2:00:00, 1-12:00")
    res.add_argument("--gpus", type=int, metavar="N", help="GPUs per cell")
    res.add_argument("--cpus", type=int, metavar="N",
                     help="CPUs per cell (default: --threads x ranks, else 1 per rank); torch threads = CPUs / ranks")
    res.add_argument("--mem", metavar="SIZE", help="memory per cell, e.g. 16G")
    res.add_argument("--max-parallel", type=int, metavar="N", help="at most N cells at once (SLURM's array %%N)")
    res.add_argument("--sbatch", metavar="PATH", help="sbatch to call (default: $BATCHSCOPE_SBATCH, else sbatch)")
    res.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                     help="extra sbatch option for the script, e.g. --sbatch-arg=--account=ml (repeatable)")
    res.add_argument("--submitit-cluster", choices=("slurm", "local", "debug"),
                     help="submitit executor: slurm, local or debug (default: slurm when sbatch exists, else local)")
    res.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join, e.g. auto (default: start a local Ray)")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def common_args(argv: list[str]) -> list[str]:
    """The runs' own options: the user's command line minus the sweep's (cells add their grid point)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in SWEEP_OPTIONS:
            skip = "=" not in a
            continue
        rest.append(a)
    return rest


# Options that mean something only to some launchers: given to another, they are an error, not ignored.
ONLY_FOR = {"jobs": ("local",), "partition": ("slurm", "submitit"), "time": ("slurm", "submitit"),
            "mem": ("slurm", "submitit"), "max_parallel": ("slurm", "submitit"), "gpus": ("slurm", "submitit", "ray"),
            "cpus": ("slurm", "submitit", "ray"), "sbatch": ("slurm",), "sbatch_arg": ("slurm",),
            "submitit_cluster": ("submitit",), "ray_address": ("ray",)}


def _error(message: str) -> int:
    print(f"python -m trainer sweep: error: {message}", file=sys.stderr)
    return 2


def check_launcher_options(args: argparse.Namespace) -> None:
    """Raise SweepError for an option the chosen launcher would ignore, or a value out of range."""
    from trainer.launchers.manifest import SweepError

    for opt, launchers in ONLY_FOR.items():
        if getattr(args, opt) not in (None, []) and args.launcher not in launchers:
            raise SweepError(f"--{opt.replace('_', '-')} is for --launcher {' or '.join(launchers)}, "
                             f"not {args.launcher}")
    for opt in ("jobs", "nproc_per_node", "cpus", "gpus", "max_parallel"):
        if getattr(args, opt) is not None and getattr(args, opt) <= 0:
            raise SweepError(f"--{opt.replace('_', '-')} must be positive")
    if args.retries < 0:
        raise SweepError("--retries must be >= 0")
    if args.launcher == "slurm":
        from trainer.launchers.slurm import sbatch_command

        sbatch_command(args.sbatch)  # no sbatch here: say so before anything is written


def threads_per_rank(args: argparse.Namespace, jobs: int) -> int:
    """--threads, else: locally the cores shared by the runs at once; elsewhere the cell's --cpus by its ranks."""
    ranks = args.nproc_per_node
    if args.threads:
        return args.threads
    if args.launcher == "local":
        return max(1, cpu_count() // (jobs * ranks))
    return max(1, (args.cpus or ranks) // ranks)


def validate_cells(cells: list, world: int = 1) -> dict:
    """Check every cell's run options as the trainer will (exit 2 on the first bad one; `world`: DDP ranks
    per cell) and load the data once; returns the options the cells share, which a resumed sweep must keep."""
    from trainer.cli import build_parser as train_parser
    from trainer.cli import config_from_args, prepare
    from trainer.config import validate

    options: dict = {}
    for i, cell in enumerate(cells):
        cfg = config_from_args(train_parser().parse_args(list(cell.argv)))
        validate(cfg, world)
        if i == 0:
            prepare(cfg)  # loads the data once: a missing --data-dir file fails here, not 40 times
            options = {k: v for k, v in cfg.to_json().items() if k not in GRID_KEYS}
    return options


def main(argv: list[str]) -> int:
    """Validate the whole grid first (exit 2 on bad input), skip what the store has, launch the rest."""
    import collector
    from trainer import launchers
    from trainer.config import ConfigError
    from trainer.datasets import DataError
    from trainer.launchers.cell import cell_states
    from trainer.launchers.manifest import Manifest, SweepError, check_same_options, make_cells, sweep_dir
    from trainer.launchers.manifest import write_manifest as write
    from trainer.launchers.slurm import SlurmOptions

    args = build_parser().parse_args(argv)
    try:
        check_launcher_options(args)
        engine = launchers.load(args.launcher)
    except (SweepError, launchers.LauncherUnavailable) as exc:
        return _error(str(exc))
    ranks, local = args.nproc_per_node, args.launcher == "local"
    jobs = args.jobs or max(1, cpu_count() // ranks)
    threads = threads_per_rank(args, jobs)
    sweep = args.sweep or f"{args.task}-{datetime.now():%Y%m%d-%H%M%S}"
    db = str(collector.resolve_db(args.db).resolve())
    cells = make_cells(common_args(argv), args.batch, args.lr, args.seed, sweep=sweep, db=db, threads=threads)
    folder = sweep_dir(db, sweep) if args.sweep_dir is None else Path(args.sweep_dir).resolve()
    try:
        options = validate_cells(cells, ranks) | {"nproc_per_node": ranks}
        check_same_options(folder, options)
        states = cell_states(db, sweep)
    except (ConfigError, DataError, SweepError, ValueError, OSError) as exc:
        return _error(str(exc))
    except collector.StoreError as exc:
        return _error(f"cannot read which cells are done: {exc}")

    todo = [c for c in cells if not (c.cell_id in states and (states[c.cell_id].done or states[c.cell_id].running))]
    done = sum(1 for c in cells if c.cell_id in states and states[c.cell_id].done)
    grid = f"{len(args.batch)} batch sizes x {len(args.lr)} learning rates" + (
        f" x {len(args.seed)} seeds" if len(args.seed) > 1 else "")
    known = f"; {done} already done" if done else ""
    if len(cells) - len(todo) - done:
        known += f", {len(cells) - len(todo) - done} running elsewhere"
    how = (f"{jobs} at a time with {threads} thread(s) each" if local else f"with {args.launcher}") + (
        f", {ranks} ranks per run (torchrun)" if ranks > 1 else "")
    print(f"sweep {sweep}: {len(cells)} runs ({grid}){known}; {len(todo)} to run {how} -> {db}", flush=True)
    if not todo:
        print(f"nothing to do: every cell of sweep {sweep} is done or running")
        return 0
    manifest = Manifest(sweep=sweep, db=db, launcher=args.launcher, cells=todo, threads=threads,
                        nproc_per_node=ranks, retries=args.retries)
    opts = SlurmOptions(partition=args.partition, time=args.time, gpus=args.gpus, cpus=args.cpus, mem=args.mem,
                        max_parallel=args.max_parallel, extra=tuple(args.sbatch_arg))
    t0 = time.perf_counter()
    try:
        path = write(manifest, folder)
        if args.launcher == "slurm":
            engine.launch(manifest, path, opts, args.sbatch)
            print(f"when it is done:  python -m collector runs --sweep {sweep} --db {db}")
            print("re-run this command to resume the sweep (requeued and missing cells only)")
            return 0
        if local:
            results = engine.launch(manifest, jobs, states)
        elif args.launcher == "submitit":
            results = engine.launch(manifest, folder / "submitit", opts, args.submitit_cluster)
        else:
            results = engine.launch(manifest, args.cpus, args.gpus, args.ray_address)
        statuses = launchers.report(results, len(todo))
    except SweepError as exc:
        return _error(str(exc))
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    print(f"sweep {sweep} done in {time.perf_counter() - t0:.0f} s: {summary}")
    print(f"look at it:  python -m dashboard --db {db}")
    print(f"or:          python -m collector runs --sweep {sweep} --db {db}")
    return 1 if statuses.get("failed") else 0
