"""GradientNoise's overhead alone, steady under load: a bare loop vs the same loop plus GradientNoise.

    python bench/bench_noise_overhead.py --task digits --batch 32
    python bench/bench_noise_overhead.py --task teacher --batch 1024 --chunk 5 --rounds 30
    python bench/bench_noise_overhead.py --task charlm --width 256 --chunk 1 --rounds 6
    python bench/bench_noise_overhead.py --code /tmp/old_tree ...   # another checkout's trainer/

Four loops are built in one process (bare; + GradientNoise(model) at K = 1; bare with 4 micro-batches;
+ GradientNoise(model, per_example=False) with 4) and run in chunks of `--chunk` steps, alternated
`--rounds` times. Each chunk's thread CPU time is kept, and a ratio is taken between the 10th
percentiles (and the medians): interference from other processes only ever adds time, so the low
percentile is the steadier figure on a shared machine. ATen ops per step are counted with a
TorchDispatchMode, which does not depend on the load.

The loops, the chunked timing and the op count are importable (bench/gpu_check.py runs them on CUDA,
where a chunk is timed by the wall clock between two device synchronisations instead).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LOOPS = {"bare": (None, 1), "pe": ({}, 1), "bare4": (None, 4), "k4": ({"per_example": False}, 4)}


class Loop:
    """One training loop over a few fixed device batches; `noise`: GradientNoise options (None: bare)."""

    def __init__(self, task, batches: list, noise: dict | None = None, accum: int = 1):
        from trainer.noise import GradientNoise  # imported late: --code picks the checkout first

        torch.manual_seed(0)
        self.task, self.batches = task, batches
        self.model = task.build_model().to(task.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.gns = GradientNoise(self.model, warn=False, **noise) if noise is not None else None
        self.accum, self.i, self.kept = accum, 0, []

    def steps(self, n: int) -> None:
        model, opt, gns, k, loss_fn, batches = self.model, self.opt, self.gns, self.accum, self.task.loss_fn, self.batches
        for _ in range(n):
            x, y = batches[self.i % len(batches)]
            self.i += 1
            opt.zero_grad(set_to_none=True)
            if k == 1:
                loss_fn(model(x), y).backward()
            else:
                for xk, yk in zip(x.chunk(k), y.chunk(k), strict=True):
                    (loss_fn(model(xk), yk) / k).backward()
            if gns is not None:
                self.measure(gns)
            opt.step()
        if len(self.kept) > 1000:
            self.kept.clear()

    def measure(self, gns) -> None:
        """The step's noise ingredients, kept on the device as a logging loop would."""
        self.kept.append(gns.step().g_small_sq)


def make_loops(task, batch: int, sketch: int = 0) -> dict[str, Loop]:
    """The four loops of LOOPS (and with sketch = k, "sketch": per-example norms with k projections),
    sharing 8 batches of `batch` drawn once on the task's device."""
    batches = [task.next_batch(batch) for _ in range(8)]
    loops = LOOPS | ({"sketch": ({"sketch": sketch}, 1)} if sketch else {})
    return {name: Loop(task, batches, noise, accum) for name, (noise, accum) in loops.items()}


class CountOps(TorchDispatchMode):
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        CountOps.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(loops: dict[str, Loop], warm: int = 20, counted: int = 10) -> dict[str, float]:
    """ATen ops per step of each loop over `counted` steps, after `warm` warm-up steps (which the timing
    then needs no more)."""
    ops = {}
    for name, loop in loops.items():
        loop.steps(warm)
        CountOps.n = 0
        with CountOps():
            loop.steps(counted)
        ops[name] = CountOps.n / counted
    return ops


def clock_for(device: torch.device) -> Callable[[], float]:
    """The thread's CPU time on the CPU (steady under load); on an accelerator the wall clock after a
    device synchronisation (the GPU's work, which thread time does not see)."""
    if device.type != "cuda":
        return time.thread_time

    def synced() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return synced


def chunk_times(loops: dict[str, Loop], chunk: int, rounds: int, clock: Callable[[], float] = time.thread_time,
                deadline: float | None = None) -> dict[str, list[float]]:
    """Seconds per step of each chunk, the loops alternated chunk by chunk `rounds` times (fewer if the
    perf_counter `deadline` passes; at least one round)."""
    times: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(rounds):
        if r and deadline is not None and time.perf_counter() > deadline:
            break
        for name, loop in loops.items():
            c0 = clock()
            loop.steps(chunk)
            times[name].append((clock() - c0) / chunk)
    return times


def quantile(values: list[float], p: float) -> float:
    """The lower p-quantile by rank (no interpolation)."""
    v = sorted(values)
    return v[int(p * (len(v) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=20, help="steps per timed chunk")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--width", type=int, help="charlm: model width")
    ap.add_argument("--code", help="repository root whose trainer/ to measure (default: this one)")
    ap.add_argument("--sketch", type=int, default=0, help="also GradientNoise(sketch=K) at K = 1")
    args = ap.parse_args()
    sys.path.insert(0, args.code or str(Path(__file__).resolve().parents[1]))
    from trainer.tasks import TaskOptions, make_task

    torch.set_num_threads(1)
    task = make_task(args.task, TaskOptions(width=args.width), torch.device("cpu"), seed=0)
    loops = make_loops(task, args.batch, args.sketch)
    ops = count_ops(loops)
    times = chunk_times(loops, args.chunk, args.rounds)

    def q(name: str, p: float) -> float:
        return quantile(times[name], p)

    print(f"# {args.task} B={args.batch}, code {args.code or 'this checkout'}, {args.rounds} x {args.chunk} steps")
    for p, label in ((0.1, "p10"), (0.5, "median")):
        print(f"{label}: bare {q('bare', p) * 1e6:.0f} us, per-example {q('pe', p) / q('bare', p):.3f}x; "
              f"bare K=4 {q('bare4', p) * 1e6:.0f} us, K=4 {q('k4', p) / q('bare4', p):.3f}x"
              + (f"; sketch={args.sketch} {q('sketch', p) / q('bare', p):.3f}x" if args.sketch else ""))
    print("ATen ops per step: " + ", ".join(f"{k} {v:.0f}" for k, v in ops.items()))


if __name__ == "__main__":
    main()
