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
  4 env      GPU, driver, torch, CUDA, NCCL, Python, commit
All of it is one markdown block for BENCHMARKS.md, printed at the end and rewritten after every part to
$OUT/gpu_check.md (with the raw figures in gpu_check.json) when OUT or --out is set.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

SHARES = (("trainer", 0.42), ("noise", 0.2), ("ddp", 0.3))  # of --budget-s; the rest is headroom
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
    a tenth of the steps, then rounds of every variant while the next one fits; the steps shrink (to no
    fewer than that tenth) if one round would take over a third of the time left."""
    small = max(2, steps // 10)
    for _ in range(2):  # the first absorbs one-time costs (CUDA context, cuBLAS, the store's schema)
        t0 = time.perf_counter()
        for fn in variants.values():
            fn(small)
    t1 = time.perf_counter()
    per_round = (t1 - t0) * steps / small
    if per_round > (deadline - t1) / 3:
        steps = max(small, int(steps * (deadline - t1) / 3 / per_round))
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


def part_trainer(sz: Sizes, device: torch.device, deadline: float, data: dict) -> list[str]:
    from bench.trainer_common import ratio
    from trainer.tasks import make_task

    lines = ["| task | model | B | bare ms/step | trainer, nothing stored | + logging to the store "
             "| default (noise every step) | final eval, subtracted | repeats x steps |", "|" + "---|" * 9]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "trainer.duckdb"
        for i, (name, batch) in enumerate(sz.configs):
            try:
                task = make_task(name, sz.task_options(name), device, seed=0)
                variants = trainer_variants(name, task, batch, db)
                end = time.perf_counter() + (deadline - time.perf_counter()) / (len(sz.configs) - i)
                times, steps = interleave_until(variants, sz.steps, end, sz.max_repeats)
                ev = eval_seconds(task)
                for v in ("loop", "logging", "default"):  # the trainer's clock includes its final evaluation
                    times[v] = [(w - ev / steps, c) for w, c in times[v]]
                ms = {v: 1e3 * statistics.median(t[0] for t in times[v]) for v in variants}
                r = {v: ratio(times, v, "bare", 0) for v in variants if v != "bare"}
                data.setdefault("trainer", []).append({"task": name, "batch": batch, "steps": steps, "ms": ms,
                                                       "ratio": r, "eval_ms": 1e3 * ev, "times": times})
                cells = " | ".join(f"{ms[v]:.3f} ms ({r[v]:.2f}x)" for v in ("loop", "logging", "default"))
                lines.append(f"| {name} | {task.model_name} | {batch} | {ms['bare']:.3f} | {cells} "
                             f"| {1e3 * ev:.1f} ms | {len(times['bare'])} x {steps} |")
            except Exception as exc:  # noqa: BLE001 - one config's failure keeps the others
                lines.append(f"| {name} | | {batch} | FAILED: {_short(exc)} |")
                data.setdefault("errors", []).append(traceback.format_exc())
    lines += ["", "Ratios: median over repeats of (trainer / bare of the same repeat), wall clock; the trainer "
                       "is bench_trainer.py's trainer_run (SGD, lr 0.01), the bare loop its bare()."]
    return lines


def part_noise(sz: Sizes, device: torch.device, deadline: float, data: dict) -> list[str]:
    from bench.bench_noise_overhead import chunk_times, clock_for, count_ops, make_loops, quantile
    from trainer.tasks import make_task

    lines = ["| task | B | bare ms/step | per-example K=1, p10 (median) | bare K=4 ms/step "
             "| K=4 micro-batch hooks, p10 (median) | ATen ops/step bare, pe, bare4, k4 | rounds x chunk |",
             "|" + "---|" * 8]
    for i, (name, batch) in enumerate(sz.configs):
        try:
            task = make_task(name, sz.task_options(name), device, seed=0)
            loops = make_loops(task, batch)
            ops = count_ops(loops)  # also the warm-up
            end = time.perf_counter() + (deadline - time.perf_counter()) / (len(sz.configs) - i)
            times = chunk_times(loops, sz.chunk, sz.max_rounds, clock_for(device), deadline=end)

            def q(v: str, p: float, times=times) -> float:
                return quantile(times[v], p)

            data.setdefault("noise", []).append({"task": name, "batch": batch, "ops": ops, "times": times})
            lines.append(f"| {name} | {batch} | {1e3 * q('bare', 0.1):.3f} | {q('pe', 0.1) / q('bare', 0.1):.2f}x "
                         f"({q('pe', 0.5) / q('bare', 0.5):.2f}x) | {1e3 * q('bare4', 0.1):.3f} | "
                         f"{q('k4', 0.1) / q('bare4', 0.1):.2f}x ({q('k4', 0.5) / q('bare4', 0.5):.2f}x) | "
                         + ", ".join(f"{ops[k]:.0f}" for k in ("bare", "pe", "bare4", "k4"))
                         + f" | {len(times['bare'])} x {sz.chunk} |")
        except Exception as exc:  # noqa: BLE001
            lines.append(f"| {name} | {batch} | FAILED: {_short(exc)} |")
            data.setdefault("errors", []).append(traceback.format_exc())
    lines += ["", "Each chunk timed by the wall clock between device synchronisations (thread CPU time on the "
                       "CPU); p10 and median over chunks, ratio of the same quantiles."]
    return lines


def steady_step_s(steps: list[int], wall: list[float], period: int) -> float | None:
    """Seconds per step from a run's stored wall_time (host time when a step was queued), between the
    first steps after the second and the last host sync: there the host waited for the device, so the
    span is the device's, without the first block's warm-up or the final evaluation."""
    marks = [(s, t) for s, t in zip(steps, wall, strict=True) if s > period and (s - 1) % period == 0]
    if len(marks) < 2:
        return None
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return (t1 - t0) / (s1 - s0)


def stored_run(db: Path, name: str, period: int) -> dict | None:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        run = con.execute("SELECT run_id, status, world_size, batch_size, micro_batch_size, device, "
                          "config->>'backend' FROM runs WHERE name = ?", [name]).fetchone()
        if run is None:
            return None
        rows = con.execute("SELECT step, wall_time, g_small_sq IS NOT NULL AND g_big_sq IS NOT NULL "
                           "AND b_small IS NOT NULL AND b_big IS NOT NULL, b_simple IS NOT NULL "
                           "FROM steps WHERE run_id = ? ORDER BY step", [run[0]]).fetchall()
    keys = ("run_id", "status", "world_size", "batch_size", "micro_batch_size", "device", "backend")
    return dict(zip(keys, run, strict=True)) | {
        "steps": len(rows), "noise_rows": sum(r[2] for r in rows), "b_simple_rows": sum(r[3] for r in rows),
        "step_s": steady_step_s([r[0] for r in rows], [r[1] for r in rows], period)}


CHILDREN: list[subprocess.Popen] = []


def run_child(cmd: list[str], timeout: float) -> tuple[int | str, str]:
    """Run a launcher in its own process group (killed whole on timeout); (exit code, output's tail)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BATCHSCOPE_DB", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    CHILDREN.append(proc)
    try:
        out, _ = proc.communicate(timeout=max(5.0, timeout))
        return proc.returncode, out[-1500:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return f"timeout {timeout:.0f} s", (out or "")[-1500:]
    finally:
        CHILDREN.remove(proc)


def run_here(argv: list[str]) -> tuple[int, str]:
    """`python -m trainer ARGV` in this process (trainer.cli.main, a process start saved); output kept."""
    from trainer import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = cli.main(argv)
    return code, buf.getvalue()[-1500:]


def part_ddp(sz: Sizes, device: torch.device, deadline: float, data: dict, ranks: int | None) -> list[str]:
    from trainer.train import sync_every

    n = ranks or (torch.cuda.device_count() if device.type == "cuda" else 1)
    period = sync_every(device)
    steps = sz.ddp_blocks * period + 1
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    lines = ["| run | exit | status | world_size | backend | batch (per rank) | steps stored | noise columns filled "
             "| b_simple filled | ms/step | vs one process |", "|" + "---|" * 11]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "ddp.duckdb"
        common = ["--task", sz.ddp_task, "--batch", str(sz.ddp_micro * n), "--lr", "0.05", "--steps", str(steps),
                  "--eval-every", str(10**9), "--db", str(db), "--device", device.type, "--no-progress"]
        runs = [("one process", None), (f"torchrun x{n}", [*launch, str(n), "-m", "trainer"])]
        if n == 1:
            runs.append(("torchrun x1, DDP forced", [*launch, "1", str(Path(__file__).resolve()), "--one-rank-ddp"]))
        base = None
        for i, (label, cmd) in enumerate(runs):
            name = f"gpu-check-ddp-{i}"
            try:
                argv = [*common, "--name", name]
                code, tail = (run_here(argv) if cmd is None else
                              run_child([*cmd, *argv], (deadline - time.perf_counter()) / (len(runs) - i)))
                r = stored_run(db, name, period) if db.exists() else None
                data.setdefault("ddp", []).append({"label": label, "exit": code, "stored": r, "tail": tail})
                if code != 0:
                    data.setdefault("errors", []).append(f"{label}: exit {code}\n{tail}")
                if r is None:
                    lines.append(f"| {label} | {code} | not stored: {_last_line(tail)} |")
                    continue
                ms = None if r["step_s"] is None else 1e3 * r["step_s"]
                base = ms if i == 0 else base
                vs = f"{ms / base:.2f}x" if ms and base else "-"
                lines.append(f"| {label} | {code} | {r['status']} | {r['world_size']} | {r['backend'] or 'none'} "
                             f"| {r['batch_size']} ({r['micro_batch_size']}) | {r['steps']}/{steps} "
                             f"| {r['noise_rows']}/{r['steps']} | {r['b_simple_rows']}/{r['steps']} "
                             f"| {'-' if ms is None else f'{ms:.3f}'} | {vs} |")
            except Exception as exc:  # noqa: BLE001
                lines.append(f"| {label} | FAILED: {_short(exc)} |")
                data.setdefault("errors", []).append(traceback.format_exc())
    lines += ["", f"`python -m trainer {' '.join(common[:-5])} --device {device.type}`; ms/step from the stored "
                       f"wall_time between host syncs (every {period} steps) after the first block. backend 'none': "
                       "the run was not DDP (the trainer treats a 1-rank torchrun as one process)."]
    return lines


def one_rank_ddp(argv: list[str]) -> int:
    """Under `torchrun --nproc-per-node 1`: the trainer's DDP path (process group, DDP wrapper, noise from
    the wrapped model, one writing rank) on a 1-rank group, which `python -m trainer` runs as one process."""
    from trainer import cli, ddp

    class OneRank(ddp.DistEnv):
        @property
        def active(self) -> bool:
            return True

    env = OneRank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    cfg = cli.config_from_args(cli.build_parser().parse_args(argv))
    task, plan = cli.prepare(cfg, env)
    ddp.init(env, task.device)
    try:
        return cli.run_training(cfg, task, plan, progress=False, env=env)
    finally:
        ddp.shutdown()


def environment(device: torch.device, args: argparse.Namespace) -> list[str]:
    lines = [f"- device: {device}" + (f" = {torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} GPU(s), "
                                      f"capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}, "
                                      f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
                                      if device.type == "cuda" else f" ({platform.processor() or 'cpu'}, "
                                      f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()})")]
    if device.type == "cuda":
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            lines.append(f"- nvidia-smi: {smi}")
        except (OSError, subprocess.SubprocessError) as exc:
            lines.append(f"- nvidia-smi: {_short(exc)}")
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else "?"
        lines.append(f"- CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                     f"NCCL {'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}")
    lines.append(f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}")
    lines.append(f"- code: {_commit()}; `python bench/gpu_check.py{' --dry-run' if args.dry_run else ''} "
                 f"--budget-s {args.budget_s:.0f}`" + (" (dry run: CPU, tiny sizes, figures meaningless)"
                                                       if args.dry_run else ""))
    return lines


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("BATCHSCOPE_COMMIT", "unknown (no .git; set BATCHSCOPE_COMMIT)")


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200].replace("|", "/")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:200].replace("|", "/")


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
    if argv[:1] == ["--one-rank-ddp"]:
        return one_rank_ddp(argv[1:])
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
        rep.notes.append(f"- hard cap: stopped at {args.budget_s:.0f} s + 30 s in part {running[0]}; it and later "
                         "parts are missing")
        for proc in list(CHILDREN):
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        rep.save()
        print(rep.markdown(), flush=True)
        os._exit(3)

    running = ["env"]
    watchdog = threading.Timer(args.budget_s + 30, hard_stop)
    watchdog.daemon = True
    watchdog.start()
    rep.sections["env"] = environment(device, args)
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
