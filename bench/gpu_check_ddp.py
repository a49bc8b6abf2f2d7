"""Part 3 of bench/gpu_check.py: `torchrun --nproc-per-node N -m trainer` vs `python -m trainer`, read back
from the store, and (run as a script under torchrun with --one-rank-ddp) the trainer's DDP path forced
onto a 1-rank group, which `python -m trainer` runs as one process.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def part_ddp(sz, device: torch.device, deadline: float, data: dict, ranks: int | None) -> list[str]:
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


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200].replace("|", "/")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:200].replace("|", "/")


if __name__ == "__main__" and sys.argv[1:2] == ["--one-rank-ddp"]:
    sys.exit(one_rank_ddp(sys.argv[2:]))
