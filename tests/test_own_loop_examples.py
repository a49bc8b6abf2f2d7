"""docs/own-loop.md's examples stay true: the plain loop, accumulation, DDP and FSDP scripts run as written,
as subprocesses (DDP and FSDP under torchrun with 2 gloo processes), and each leaves one finished run with the
noise-scale ingredients on every step and a positive B_simple from the store's own macro."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from collector.store import read_connection

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(cmd: list[str], cwd: Path) -> str:
    # one torch thread: these models are far too small for intra-op threads, which spin on a busy machine
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES.parent), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def stored(db: Path) -> tuple[dict, list[dict], list[dict], list[dict]]:
    with read_connection(db) as con:
        runs = con.sql("SELECT * FROM runs").pl().to_dicts()
        steps = con.sql("SELECT * FROM steps ORDER BY step").pl().to_dicts()
        evals = con.sql("SELECT * FROM evals ORDER BY step").pl().to_dicts()
        assert len(runs) == 1
        at = len(steps) * 2 // 3  # one wide window over the second half: per-step estimates are noisy
        noise = con.sql(f"WITH p AS (SELECT run_id, {at}.0 AS at_step FROM runs) "
                        "SELECT b_simple, n_noise FROM noise_at_points('p', noise_window := 0.5)").pl().to_dicts()
    return runs[0], steps, evals, noise[0]


def check(db: Path, steps_expected: int, batch: int, b_small: float) -> tuple[dict, list[dict], list[dict]]:
    run, steps, evals, noise = stored(db)
    assert run["status"] == "finished"
    assert [s["step"] for s in steps] == list(range(1, steps_expected + 1))
    for s in steps:
        assert s["examples"] == s["step"] * batch and s["batch_size"] == batch
        assert s["b_small"] == b_small and s["b_big"] == batch
        assert s["g_small_sq"] > 0 and s["g_big_sq"] > 0 and math.isfinite(s["loss"])
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert noise["n_noise"] >= steps_expected // 3 and 1 < noise["b_simple"] < 1e5
    return run, steps, evals


def test_plain_loop_example(tmp_path):
    out = run_example([sys.executable, str(EXAMPLES / "plain_loop.py"), "--db", "runs.duckdb", "--steps", "100"],
                      tmp_path)
    assert "100 steps logged to runs.duckdb" in out
    run, _, evals = check(tmp_path / "runs.duckdb", 100, 32, b_small=1.0)  # per-example norms, K = 1
    assert (run["batch_size"], run["lr"], run["task"]) == (32, 0.1, "teacher")
    assert [(e["step"], e["split"]) for e in evals] == [(50, "test"), (100, "test")]


def test_accumulation_example(tmp_path):
    run_example([sys.executable, str(EXAMPLES / "accumulation.py"), "--db", "runs.duckdb", "--steps", "40",
                 "--accum", "4"], tmp_path)
    run, steps, _ = check(tmp_path / "runs.duckdb", 40, 64, b_small=1.0)  # Conv, LayerNorm, Linear: per example
    assert (run["accum_steps"], run["micro_batch_size"]) == (4, 16)
    assert steps[0]["lr"] == pytest.approx(3e-3) and steps[-1]["lr"] < steps[0]["lr"]  # cosine schedule


def test_ddp_example_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    run_example([str(torchrun), "--standalone", "--nproc-per-node", "2", str(EXAMPLES / "ddp.py"), "--db",
                 "runs.duckdb", "--steps", "40"], tmp_path)
    run, _, _ = check(tmp_path / "runs.duckdb", 40, 32, b_small=1.0)
    assert (run["world_size"], run["batch_size"], run["micro_batch_size"], run["rank"]) == (2, 32, 16, 0)


def test_fsdp_example_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = run_example([str(torchrun), "--standalone", "--nproc-per-node", "2", str(EXAMPLES / "fsdp.py"), "--db",
                       "runs.duckdb", "--steps", "40"], tmp_path)
    assert "40 steps of 2 sharded ranks" in out
    run, _, _ = check(tmp_path / "runs.duckdb", 40, 32, b_small=1.0)  # every layer per example, sharded
    assert (run["world_size"], run["batch_size"], run["optimizer"]) == (2, 32, "adamw")


def test_every_excerpt_in_the_doc_is_in_its_script():
    """docs/own-loop.md quotes the scripts: each excerpt's lines appear in its script, in order, verbatim."""
    doc = (EXAMPLES.parent / "docs" / "own-loop.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    quoted = [b for b in blocks if b.startswith("# examples/")]
    assert len(quoted) == 6
    for block in quoted:
        head, *lines = block.rstrip("\n").split("\n")
        script = (EXAMPLES.parent / head[2:]).read_text().split("\n")
        at = 0
        for line in filter(str.strip, lines):
            assert line in script[at:], f"{head[2:]}: not found (in order): {line!r}"
            at = script.index(line, at) + 1
