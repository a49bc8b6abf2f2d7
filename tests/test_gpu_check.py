"""bench/gpu_check.py, the prepared GPU check of issue 12, as its --dry-run: the same code on the CPU at tiny
sizes, in a subprocess, must give every section of its markdown block with figures and no failure, so a
session that is lent a GPU for minutes runs it without debugging there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check_ddp import steady_step_s

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("#### Environment", "#### 1. Trainer", "#### 2. GradientNoise", "#### 3. DDP", "#### Notes")


def rows(markdown: str, header: str) -> list[list[str]]:
    """The body rows of the first table under `header`, as stripped cells."""
    part = markdown.split(header, 1)[1].split("\n#### ", 1)[0]
    table = [ln for ln in part.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[str, str, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHSCOPE_", "OUT", "RANK", "WORLD_SIZE"))}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, (out / "gpu_check.md").read_text(), json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow  # 35-65 s on the shared 2-core machine (load 2-5): 2 torchrun jobs, ~40 tiny runs
def test_the_dry_run_fills_every_section_and_fails_nowhere(dry_run):
    stdout, md, data = dry_run
    assert md in stdout  # the block printed is the block written
    assert [s for s in SECTIONS if s not in md] == []
    assert "FAILED" not in md and "(not run)" not in md and "errors: 0" in md
    assert data.get("errors") is None
    for header in ("#### 1. Trainer", "#### 2. GradientNoise"):
        table = rows(md, header)
        assert [r[0] for r in table] == ["digits", "teacher", "charlm"]
        for r in table:  # every figure is a positive number (ms per step or a ratio)
            nums = [float(c.split()[0].rstrip("x")) for c in r[2:6] if c and c[0].isdigit()]
            assert len(nums) == 4 and all(v > 0 for v in nums), r
    trainer = {r["task"]: r for r in data["trainer"]}
    for r in trainer.values():  # each ratio is the median of the per-repeat ratios of the stored times
        t = r["times"]
        assert r["ratio"]["default"] == pytest.approx(
            sorted(a[0] / b[0] for a, b in zip(t["default"], t["bare"], strict=True))[len(t["bare"]) // 2])


@pytest.mark.slow
def test_the_dry_run_records_the_ddp_runs_from_the_store(dry_run):
    _, md, data = dry_run
    table = {r[0]: r for r in rows(md, "#### 3. DDP")}
    assert list(table) == ["one process", "torchrun x1", "torchrun x1, DDP forced"]
    for label, r in table.items():
        exit_code, status, world, backend, _, stored, noise, _, ms = r[1:10]
        assert (exit_code, status, world) == ("0", "finished", "1"), r
        n, total = stored.split("/")
        assert n == total and noise == f"{n}/{n}", r  # every step stored, with the noise ingredients
        assert float(ms) > 0
        # a 1-rank torchrun is one process to the trainer; only the forced run went through DDP (gloo here)
        assert backend == ("gloo" if label.endswith("forced") else "none"), r
    stored = [d["stored"] for d in data["ddp"]]
    assert len({s["run_id"] for s in stored}) == 3


def test_steady_step_time_is_the_devices_between_host_syncs():
    """A simulated run: the host queues steps at 0.1 ms each and runs ahead of the device (2 ms a step,
    the first with 0.5 s of warm-up) until each sync every 25 steps waits for the device. The stored
    wall_time is when a step was queued; the device's time per step must come back, not the host's."""
    period, per_step, steps, wall = 25, 0.002, list(range(1, 102)), []
    host = device = 0.0
    for s in steps:
        host += 1e-4
        wall.append(host)
        device = max(device, host) + per_step + (0.5 if s == 1 else 0.0)
        if s % period == 0:
            host = device  # the sync: the host waits for every queued step
    assert steady_step_s(steps, wall, period) == pytest.approx(per_step, rel=0.005)  # + one queued step per block
    naive = (wall[-1] - wall[0]) / (steps[-1] - steps[0])  # what a plain span would say: warm-up included
    assert naive > 1.2 * per_step
    assert steady_step_s(steps[:40], wall[:40], period) is None  # one sync after the warm-up: no span
