"""Where GradientNoise's cost goes at K = 1 on a small CPU step: its parts swapped for no-ops, one at a time.

    python bench/bench_noise_parts.py --task digits --batch 32

Loops, interleaved in one process (p10 of thread CPU time per step over `--rounds` chunks):
  bare      the plain step (forward, backward, SGD)
  hooks     + GradientNoise whose per-example rules return a constant: the forward hooks and autograd
            pre-hooks alone, no arithmetic, step() skipped
  rules     + the real rules, step() skipped
  full      + step() (the ingredients as device tensors, as a logging loop keeps them)
Differences between neighbours are each part's cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainer.noise as noise_mod  # noqa: E402
from trainer.per_example import rule_for  # noqa: E402
from trainer.tasks import TaskOptions, make_task  # noqa: E402

PARTS = ("bare", "hooks", "rules", "full")


def constant_rule_for(m: nn.Module, sketch: int = 0):
    """Like rule_for, but every covered layer's rule returns a cached 0 (its fits check still applies)."""
    rule = rule_for(m, sketch)
    if rule is None:
        return None
    zero = torch.zeros(())
    return lambda mod, a, d: zero


def loop(task, batches: list, part: str):
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gns = None
    if part != "bare":
        noise_mod.rule_for = constant_rule_for if part == "hooks" else rule_for
        try:
            gns = noise_mod.GradientNoise(model, warn=False)
        finally:
            noise_mod.rule_for = rule_for
    state = {"i": 0, "kept": []}

    def steps(n: int) -> None:
        for _ in range(n):
            x, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            task.loss_fn(model(x), y).backward()
            if gns is not None:
                if part == "full":
                    state["kept"].append(gns.step().g_small_sq)
                else:
                    gns.reset()
            opt.step()
        if len(state["kept"]) > 1000:
            state["kept"].clear()

    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = make_task(args.task, TaskOptions(), torch.device("cpu"), seed=0)
    batches = [task.next_batch(args.batch) for _ in range(8)]
    loops = {p: loop(task, batches, p) for p in PARTS}
    for f in loops.values():
        f(50)
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    for _ in range(args.rounds):
        for p, f in loops.items():
            c0 = time.thread_time()
            f(args.chunk)
            times[p].append((time.thread_time() - c0) / args.chunk)
    p10 = {p: sorted(v)[len(v) // 10] * 1e6 for p, v in times.items()}
    print(f"# {args.task} B={args.batch}: p10 of thread CPU per step, {args.rounds} x {args.chunk} steps")
    prev = None
    for p in PARTS:
        extra = "" if prev is None else f"  (+{p10[p] - p10[prev]:.0f} us)"
        print(f"{p:<6} {p10[p]:7.0f} us  {p10[p] / p10['bare']:.3f}x{extra}")
        prev = p


if __name__ == "__main__":
    main()
