"""Synthetic stores for the dashboard's tests and benchmarks (no trainer, no torch).

The runs follow the empirical model of McCandlish et al. (2018): reaching a loss takes
S(B) = S_min (1 + B_noise / B) steps at the best learning rate, the loss is noisy in proportion to
1/sqrt(B), the gradient-noise ingredients (|g_small|^2, |g_big|^2) are drawn around
|G|^2 + tr(Sigma)/b, learning rates far above ε_max / (1 + B_noise/B) diverge, and large batches
generalize a little worse. Good enough to exercise every page; not a substitute for real runs.

    python -m dashboard.synthetic out.duckdb --runs 1000 --steps 10000
"""

from __future__ import annotations

import argparse
import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

B_NOISE = 128.0  # the true noise scale of the synthetic task (grows mildly as the loss falls)
EPS_MAX = 0.8
_NULLABLE = {"g_small_sq", "b_small", "g_big_sq", "b_big", "b_simple"}


def _sweep_grid(n_runs: int, seeds: int) -> list[tuple[int, float, int]]:
    batches = [8, 16, 32, 64, 128, 256, 512, 1024]
    lr_mult = [0.25, 0.5, 1.0, 2.0, 4.0]
    grid = [(b, m, s) for s in range(seeds) for b in batches for m in lr_mult]
    out = list(itertools.islice(itertools.cycle(grid), n_runs))
    return out


def _run_arrays(rng: np.random.Generator, batch: int, lr: float, steps: int, eval_every: int):
    """Per-step arrays of one run, vectorized."""
    lr_opt = EPS_MAX / (1.0 + B_NOISE / batch)
    ratio = lr / lr_opt
    eff = ratio * np.exp(1.0 - ratio)  # 1 at the best LR, less on either side
    t = np.arange(1, steps + 1, dtype=np.float64)
    s_min = steps / 60.0
    rate = eff / (s_min * (1.0 + B_NOISE / batch))
    l_inf, l0 = 0.05, 2.3
    clean = l_inf + (l0 - l_inf) * np.exp(-rate * t * 6.0 / np.sqrt(1 + rate * t * 3.0))
    loss = clean * (1.0 + 0.25 / np.sqrt(batch / 8.0) * rng.standard_normal(steps))
    diverge_at = None
    if ratio > 3.0:  # unstable: blows up after a while
        diverge_at = max(2, int(steps * rng.uniform(0.02, 0.2)))
        loss[diverge_at - 1:] = np.inf
        loss[diverge_at:] = np.nan
        steps = diverge_at + 1
        t, loss, clean = t[:steps], loss[:steps], clean[:steps]
    # gradient-noise ingredients: two micro-batches of B/2 each
    g2 = 0.02 * (clean - l_inf) + 1e-5
    tr_sigma = 0.02 * B_NOISE * (0.6 + 0.4 * clean / l0)
    b_small, b_big = batch / 2.0, float(batch)
    g_big = (g2 + tr_sigma / b_big) * (1.0 + 0.05 * rng.standard_normal(steps))
    g_small = (g2 + tr_sigma / b_small) * (1.0 + 0.05 / np.sqrt(2) * rng.standard_normal(steps))
    measured = (np.arange(steps) % 10) == 0
    g_big = np.where(measured, g_big, np.nan)
    g_small = np.where(measured, g_small, np.nan)
    b_simple = np.where(measured, tr_sigma / g2, np.nan)
    wall = (0.004 + batch * 2e-5) * (1.0 + 0.05 * rng.random(steps))
    steps_tab = {
        "step": t.astype(np.int64),
        "examples": (t * batch).astype(np.int64),
        "wall_time": np.cumsum(wall),
        "batch_size": np.full(steps, batch, dtype=np.int32),
        "lr": np.full(steps, lr),
        "loss": loss,
        "g_small_sq": g_small,
        "b_small": np.where(measured, b_small, np.nan),
        "g_big_sq": g_big,
        "b_big": np.where(measured, b_big, np.nan),
        "b_simple": b_simple,
    }
    ev_steps = np.unique(np.r_[np.arange(eval_every, steps + 1, eval_every), steps]).astype(np.int64)
    ev_clean = clean[ev_steps - 1] * (1.0 + 0.02 * rng.standard_normal(len(ev_steps)))
    if diverge_at is not None:
        ev_clean = np.where(ev_steps >= diverge_at, np.nan, ev_clean)
    gap = 0.02 + 0.05 * np.log2(batch / 8.0 + 1.0) * (ev_steps / steps)
    evals = {
        "step": np.r_[ev_steps, ev_steps],
        "split": np.r_[np.full(len(ev_steps), "train"), np.full(len(ev_steps), "test")],
        "examples": np.r_[ev_steps, ev_steps] * batch,
        "loss": np.r_[ev_clean, ev_clean + gap],
        "accuracy": np.r_[np.exp(-ev_clean), np.exp(-(ev_clean + gap))],
    }
    return steps_tab, evals, diverge_at is not None


def make_store(
    db: str | Path,
    n_runs: int = 80,
    steps: int = 2000,
    seeds: int = 2,
    sweep: str = "synthetic-sweep",
    eval_every: int | None = None,
    running: int = 0,
    seed: int = 0,
    train_size: int = 50_000,
) -> Path:
    """Create (or extend) a store at `db` with `n_runs` synthetic runs of up to `steps` steps each."""
    from schema import ensure_schema, refresh_run_stats
    from schema.frames import insert_rows

    db = Path(db)
    rng = np.random.default_rng(seed)
    eval_every = eval_every or max(1, steps // 40)
    now = datetime.now(UTC)
    con = duckdb.connect(str(db))
    try:
        con.execute("SET enable_progress_bar = false")
        ensure_schema(con)
        run_rows: list[dict] = []
        step_parts: list[pa.Table] = []
        eval_parts: list[pa.Table] = []
        pending = 0

        def flush() -> None:
            nonlocal step_parts, eval_parts, pending
            if step_parts:
                insert_rows(con, "steps", pa.concat_tables(step_parts))
                insert_rows(con, "evals", pa.concat_tables(eval_parts))
            step_parts, eval_parts, pending = [], [], 0

        for i, (batch, mult, s) in enumerate(_sweep_grid(n_runs, seeds)):
            lr = round(mult * EPS_MAX / (1.0 + B_NOISE / batch), 6)
            run_id = f"{(int(rng.integers(0, 2**40)) << 8) + i % 256:012x}"
            st, ev, diverged = _run_arrays(rng, batch, lr, steps, eval_every)
            is_running = i >= n_runs - running
            if is_running:  # a live run: only part of its steps so far
                cut = max(2, len(st["step"]) // 2)
                st = {k: v[:cut] for k, v in st.items()}
                keep = ev["step"] <= cut
                ev = {k: v[keep] for k, v in ev.items()}
            n = len(st["step"])
            cols = {k: pa.array(v, from_pandas=k in _NULLABLE) for k, v in st.items()}  # NaN -> NULL
            step_parts.append(pa.table({"run_id": pa.array([run_id] * n), **cols}))
            eval_parts.append(pa.table({"run_id": pa.array([run_id] * len(ev["step"])), **ev}))
            pending += n
            started = now - timedelta(hours=2) + timedelta(seconds=i)
            status = "running" if is_running else ("diverged" if diverged else "finished")
            run_rows.append({
                "run_id": run_id, "name": f"b{batch}-lr{lr:g}-s{s}", "sweep": sweep, "status": status,
                "task": "synthetic", "model": "mlp", "optimizer": "sgd", "lr": lr, "momentum": 0.0,
                "weight_decay": 0.0, "batch_size": batch, "micro_batch_size": batch // 2, "accum_steps": 2,
                "world_size": 1, "train_size": train_size, "seed": s, "device": "cpu", "host": "synthetic",
                "config": f'{{"batch_size": {batch}, "lr": {lr}, "seed": {s}}}',
                "started_at": started,
                "ended_at": None if is_running else started + timedelta(seconds=float(st["wall_time"][-1])),
                "heartbeat_at": now if is_running else started + timedelta(seconds=float(st["wall_time"][-1])),
            })
            if pending > 2_000_000:
                flush()
        flush()
        insert_rows(con, "runs", pa.Table.from_pylist(run_rows))
        refresh_run_stats(con)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return db


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("db")
    p.add_argument("--runs", type=int, default=80)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--running", type=int, default=0)
    p.add_argument("--sweep", default="synthetic-sweep")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    make_store(a.db, a.runs, a.steps, a.seeds, a.sweep, running=a.running)
    print(f"wrote {a.runs} runs x {a.steps} steps to {a.db} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
