"""The one prepared GPU check of issue 12: every figure its "On a GPU" benchmark asks for, in one go.

    bash bench/gpu_check.sh prepare             # here, where PyPI is reachable: wheels the device image lacks
    bash bench/gpu_check.sh run                 # on the device machine (carry bench/out/gpu_wheels)
    python bench/gpu_check.py --dry-run         # the same code on the CPU at tiny sizes (< 60 s)

Parts, each in its own try/except and its own share of --budget-s (a failure keeps the others' figures):
  1 trainer  the built-in trainer (trainer.train on CUDA) vs a bare PyTorch loop of the same model, data
             and batch (digits MLP, teacher MLP at a big batch, charlm transformer): bench_trainer.py's
             loops, interleaved; ms per step (wall clock between device synchronisations) and the ratio
  2 noise    GradientNoise at K = 1 (per-example norms) and K = 4 (micro-batch hooks) vs the bare loop:
             bench_noise_overhead.py's loops, alternated in chunks; p10 and median
  3 ddp      `torchrun --nproc-per-node N -m trainer` (N = the GPU count, NCCL) vs `python -m trainer` with
             the same options: exit code, status, world_size and backend stored, noise columns on every
             step, ms per step from the stored wall_time. With N = 1 the trainer runs as one process
             (trainer/ddp.py: world 1 is no DDP), so a third run forces its DDP path onto a 1-rank group
             (bench/gpu_check_ddp.py)
  4 env      GPU, driver, torch, CUDA, NCCL, Python, commit
All of it is one markdown block for BENCHMARKS.md, printed at the end and rewritten after every part to
$OUT/gpu_check.md (with the raw figures in gpu_check.json) when OUT or --out is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check_ddp import CHILDREN, _last_line, _short, part_ddp  # noqa: E402

SHARES = (("trainer", 0.42), ("noise", 0.2), ("ddp", 0.3))  # of --budget-s; the rest is headroom before
# the hard stop at --budget-s (a watchdog thread), which saves the block as far as it got
TITLES = {"env": "Environment", "trainer": "1. Trainer (device path) vs a bare PyTorch loop",
          "noise": "2. GradientNoise every step vs the bare loop",
          "ddp": "3. DDP: torchrun vs one process, same options"}
Timing = tuple[float, float]


class Sizes:
    """What each part runs: the GPU's sizes, or tiny ones for --dry-run (same code, CPU, < 60 s)."""

    def __init__(self, dry: bool, configs: str | None):
        self.dry = dry
        self.configs = [(c.split(":")[0], int(c.split(":")[1])) for c in
                        (configs or ("digits:32,teacher:256,charlm:16" if dry else "digits:32,teacher:8192,charlm:64"))
                        .split(",")]
        self.steps, self.max_repeats = (8, 1) if dry else (300, 7)
        self.chunk, self.max_rounds = (2, 3) if dry else (20, 40)
        self.ddp_task, self.ddp_micro = ("digits", 32) if dry else ("digits", 256)
        self.ddp_blocks = 3 if dry else 20  # host-sync blocks per DDP run (sync_every steps each)

    def task_options(self, name: str):
        from trainer.tasks import TaskOptions

        tiny = self.dry and name == "charlm"
        return TaskOptions(width=32, layers=1, context=16) if tiny else TaskOptions()


def interleave_until(variants: dict[str, Callable[[int], Timing]], steps: int, deadline: float,
                     max_repeats: int) -> tuple[dict[str, list[Timing]], int]:
    """bench/trainer_common.interleave with a deadline: a warm-up round and a timed calibration round at
    a tenth of the steps (none if the warm-up was slow), then rounds of every variant while the next one
    fits; the steps shrink (to 2 at the least) where a round of `steps` would take over a third of the
    time left."""
    small = max(2, steps // 10)
    for r in range(2):  # the first absorbs one-time costs (CUDA context, cuBLAS, the store's schema)
        t0 = time.perf_counter()
        for fn in variants.values():
            fn(small)
        t1 = time.perf_counter()
        if r == 0 and t1 - t0 > (deadline - t1) / 3:  # slow already: the warm-up is the estimate
            break
    steps = max(2, min(steps, int((deadline - t1) / 3 / ((t1 - t0) / small))))
    times: dict[str, list[Timing]] = {k: [] for k in variants}
    last = 0.0
    for r in range(max_repeats):
        if r and time.perf_counter() + last > deadline:
            break
        r0 = time.perf_counter()
        for name, fn in variants.items():
            times[name].append(fn(steps))
        last = time.perf_counter() - r0
    return times, steps


def share_of(deadline: float, i: int, n: int) -> float | None:
    """The end of config i's equal share of the time left to `deadline`; None when less than 1 s is left."""
    left = deadline - time.perf_counter()
    return None if left < 1.0 else time.perf_counter() + left / (n - i)


def trainer_variants(name: str, task, batch: int, db: Path) -> dict[str, Callable[[int], Timing]]:
    """The bare loop and three trainer runs (bench_trainer.py's bare and trainer_run), as functions of steps."""
    from bench.bench_trainer import bare, trainer_run

    dev = str(task.device)
    return {"bare": lambda n: bare(task, batch, n),
            "loop": lambda n: trainer_run(name, task, batch, n, None, dev, gns_every=0),
            "logging": lambda n: trainer_run(name, task, batch, n, db, dev, gns_every=0),
            "default": lambda n: trainer_run(name, task, batch, n, db, dev, gns_every=1)}


def eval_seconds(task) -> float:
    """One evaluation of a fresh model (the trainer's run ends with one; the bare loop has none)."""
    from bench.trainer_common import sync

    model = task.build_model().to(task.device)
    out = []
    for _ in range(3):
        sync(task.device)
        t0 = time.perf_counter()
        _ = {k: float(v[0]) for k, v in task.evaluate(model).items()}
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def per_config(sz: Sizes, device: torch.device, deadline: float, data: dict, gap: int,
               row: Callable[[str, int, object, float], str]) -> list[str]:
    """One table row per (task, batch) of sz.configs, each given an equal share of the time left:
    row(name, batch, task, share's end). A config past the budget, or one that fails, gets a row saying
    so (after `gap` empty cells) and the others still run; a failure's traceback goes to data["errors"]."""
    from trainer.tasks import make_task

    lines = []
    for i, (name, batch) in enumerate(sz.configs):
        lead = f"| {name} | {'| ' * gap}{batch} |"
        try:
            end = share_of(deadline, i, len(sz.configs))
            if end is None:
                lines.append(f"{lead} skipped: the part's budget is spent |")
                continue
            lines.append(row(name, batch, make_task(name, sz.task_options(name), device, seed=0), end))
        except Exception as exc:  # noqa: BLE001 - one config's failure keeps the others
            lines.append(f"{lead} FAILED: {_short(exc)} |")
            data.setdefault("errors", []).append(traceback.format_exc())
    return lines


def part_trainer(sz: Sizes, device: torch.device, deadline: float, data: dict) -> list[str]:
    from bench.trainer_common import ratio

    lines = ["| task | model | B | bare ms/step | trainer, nothing stored | + logging to the store "
             "| default (noise every step) | final eval, subtracted | repeats x steps |", "|" + "---|" * 9]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "trainer.duckdb"

        def row(name: str, batch: int, task, end: float) -> str:
            variants = trainer_variants(name, task, batch, db)
            times, steps = interleave_until(variants, sz.steps, end, sz.max_repeats)
            ev = eval_seconds(task)
            for v in ("loop", "logging", "default"):  # the trainer's clock includes its final evaluation
                times[v] = [(w - ev / steps, c) for w, c in times[v]]
            ms = {v: 1e3 * statistics.median(t[0] for t in times[v]) for v in variants}
            r = {v: ratio(times, v, "bare", 0) for v in variants if v != "bare"}
            data.setdefault("trainer", []).append({"task": name, "batch": batch, "steps": steps, "ms": ms,
                                                   "ratio": r, "eval_ms": 1e3 * ev, "times": times})
            cells = " | ".join(f"{ms[v]:.3f} ms ({r[v]:.2f}x)" for v in ("loop", "logging", "default"))
            return (f"| {name} | {task.model_name} | {batch} | {ms['bare']:.3f} | {cells} "
                    f"| {1e3 * ev:.1f} ms | {len(times['bare'])} x {steps} |")

        lines += per_config(sz, device, deadline, data, 1, row)
    lines += ["", "Ratios: median over repeats of (trainer / bare of the same repeat), wall clock; the trainer "
                       "is bench_trainer.py's trainer_run (SGD, lr 0.01), the bare loop its bare()."]
    return lines


def part_noise(sz: Sizes, device: torch.device, deadline: float, data: dict) -> list[str]:
    from bench.bench_noise_overhead import chunk_times, clock_for, count_ops, make_loops, quantile

    lines = ["| task | B | bare ms/step | per-example K=1, p10 (median) | bare K=4 ms/step "
             "| K=4 micro-batch hooks, p10 (median) | ATen ops/step bare, pe, bare4, k4 | rounds x chunk |",
             "|" + "---|" * 8]

    def row(name: str, batch: int, task, end: float) -> str:
        loops, clock = make_loops(task, batch), clock_for(device)
        t0 = clock()
        for loop in loops.values():  # warm-up, and a step of each loop's cost, to size what follows
            loop.steps(2)
        round_s = (clock() - t0) / 2
        counts = (20, 10) if 30 * round_s < (end - time.perf_counter()) / 4 else (0, 1)
        ops = count_ops(loops, *counts)
        chunk = max(1, min(sz.chunk, int((end - time.perf_counter()) / (10 * round_s))))  # >= ~10 rounds
        times = chunk_times(loops, chunk, sz.max_rounds, clock, deadline=end)

        def q(v: str, p: float) -> float:
            return quantile(times[v], p)

        data.setdefault("noise", []).append({"task": name, "batch": batch, "ops": ops, "times": times})
        return (f"| {name} | {batch} | {1e3 * q('bare', 0.1):.3f} | {q('pe', 0.1) / q('bare', 0.1):.2f}x "
                f"({q('pe', 0.5) / q('bare', 0.5):.2f}x) | {1e3 * q('bare4', 0.1):.3f} | "
                f"{q('k4', 0.1) / q('bare4', 0.1):.2f}x ({q('k4', 0.5) / q('bare4', 0.5):.2f}x) | "
                + ", ".join(f"{ops[k]:.0f}" for k in ("bare", "pe", "bare4", "k4"))
                + f" | {len(times['bare'])} x {chunk} |")

    lines += per_config(sz, device, deadline, data, 0, row)
    lines += ["", "Each chunk timed by the wall clock between device synchronisations (thread CPU time on the "
                       "CPU); p10 and median over chunks, ratio of the same quantiles."]
    return lines


def environment(device: torch.device, args: argparse.Namespace) -> list[str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines = [f"- device: {device} = {props.name}, {torch.cuda.device_count()} GPU(s), capability "
                 f"{props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB"]
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            smi = _short(exc)
        try:
            nccl = torch.cuda.nccl.version()
            nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as exc:  # noqa: BLE001 - a build without NCCL still has the other figures
            nccl = _short(exc)
        lines += [f"- nvidia-smi: {smi}", f"- CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                  f"NCCL {nccl}"]
    else:
        lines = [f"- device: cpu ({platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
                 f"torch threads {torch.get_num_threads()})"]
    return lines + [f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}",
                    f"- code: {_commit()}; `python bench/gpu_check.py{' --dry-run' if args.dry_run else ''} "
                    f"--budget-s {args.budget_s:.0f}`" + (" (dry run: CPU, tiny sizes, figures meaningless)"
                                                          if args.dry_run else "")]


def _commit() -> str:
    """BATCHSCOPE_COMMIT (gpu_check.sh sets it from `prepare`: the device's copy has no .git), else git."""
    if os.environ.get("BATCHSCOPE_COMMIT"):
        return os.environ["BATCHSCOPE_COMMIT"].strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown (no .git and no BATCHSCOPE_COMMIT)"


class Report:
    """The markdown block and raw figures, rewritten after each part so a hard stop keeps what was done."""

    def __init__(self, title: str, out_dir: Path | None):
        self.title, self.out_dir = title, out_dir
        self.sections: dict[str, list[str]] = {k: ["(not run)"] for k in TITLES}
        self.data: dict = {}
        self.notes: list[str] = []

    def markdown(self) -> str:
        body = [f"### {self.title}", ""]
        for key, title in TITLES.items():
            body += [f"#### {title}", "", *self.sections[key], ""]
        body += ["#### Notes", "", *(self.notes or ["- none"])]
        return "\n".join(body) + "\n"

    def save(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "gpu_check.md").write_text(self.markdown())
        (self.out_dir / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=360.0, help="hard cap on the whole check (default 360)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code path, < 60 s")
    ap.add_argument("--configs", help="task:batch,... for parts 1 and 2 (default: digits:32,teacher:8192,charlm:64)")
    ap.add_argument("--ddp-ranks", type=int, help="torchrun ranks of part 3 (default: the GPU count; CPU: 1)")
    ap.add_argument("--parts", default="trainer,noise,ddp", help="which parts to run (default: all)")
    ap.add_argument("--out", help="folder for gpu_check.md/.json (default: $OUT when set)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda:0" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
        args.dry_run = True  # no CUDA: the dry run, whatever was asked
    sz = Sizes(args.dry_run, args.configs)
    out = args.out or os.environ.get("OUT")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rep = Report(f"GPU check (issue 12), {torch.cuda.get_device_name(device) if cuda else 'CPU dry run'}, {when}",
                 Path(out) if out else None)

    def hard_stop() -> None:  # a hung part (an NCCL rendezvous, say) must not eat the device lease
        rep.notes.append(f"- hard cap: stopped at {args.budget_s:.0f} s in part {running[0]}; it and later parts "
                         "are missing")
        for proc in list(CHILDREN):
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        rep.save()
        print(rep.markdown(), flush=True)
        os._exit(3)

    running = ["env"]
    watchdog = threading.Timer(args.budget_s, hard_stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        rep.sections["env"] = environment(device, args)
    except Exception as exc:  # noqa: BLE001
        rep.sections["env"] = [f"FAILED: {_short(exc)}"]
    rep.save()
    wanted = set(args.parts.split(","))
    share_end = 0.0
    for key, share in SHARES:
        share_end += share
        if key not in wanted:
            continue
        deadline = start + share_end * args.budget_s
        t0, running[0] = time.perf_counter(), key
        print(f"gpu_check: part {key} ...", file=sys.stderr, flush=True)
        try:
            if key == "trainer":
                rep.sections[key] = part_trainer(sz, device, deadline, rep.data)
            elif key == "noise":
                rep.sections[key] = part_noise(sz, device, deadline, rep.data)
            else:
                rep.sections[key] = part_ddp(sz, device, deadline, rep.data, args.ddp_ranks)
        except Exception as exc:  # noqa: BLE001 - keep the other parts' figures
            rep.sections[key] = [f"FAILED: {_short(exc)}"]
            rep.data.setdefault("errors", []).append(traceback.format_exc())
        rep.notes.append(f"- part {key}: {time.perf_counter() - t0:.0f} s")
        rep.save()
    watchdog.cancel()
    rep.notes += [f"- error: {_last_line(e)}" for e in rep.data.get("errors", [])]
    rep.notes.append(f"- total {time.perf_counter() - start:.0f} s of a {args.budget_s:.0f} s budget; "
                     f"errors: {len(rep.data.get('errors', []))}" + (" (tracebacks in gpu_check.json)"
                                                                     if rep.data.get("errors") else ""))
    rep.save()
    print(rep.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
