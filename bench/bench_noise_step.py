"""GradientNoise.step()'s own cost and the K = 1 ratio, another checkout's code against this one, in one process.

    git archive HEAD trainer | tar -x -C /tmp/old_tree          # the code before a change
    python bench/bench_noise_step.py --old /tmp/old_tree --task digits --batch 32
    python bench/bench_noise_step.py --old /tmp/old_tree --task charlm --chunk 1 --rounds 8
    python bench/bench_noise_step.py --old /tmp/old_tree --accum 4 --no-per-example   # micro-batch hooks

Loops, interleaved chunk by chunk in an order that cycles through every permutation (a loop run right
after a similar one finds torch's code paths warm: a fixed order made identical code 0.02-0.28x apart),
p10 of thread CPU time per step over `--rounds` chunks, each step `--accum` micro-batches (default 1):
  bare   the plain step (forward, backward(s), SGD)
  old    + GradientNoise(model) of `--old`'s trainer/ (imported under its own module objects)
  new    + GradientNoise(model) of this checkout
and, for old and new, the thread CPU time spent inside `step()` alone. Before timing, the two run the same
steps from the same seed and their ingredients must be bitwise equal (an optimisation changes no number).
`--hooks-only`: the hooks' bookkeeping alone, every rule returning a cached 0 and `reset()` for `step()`
(as bench_noise_parts.py's "hooks"), to see a change of a few us there apart from the rules' arithmetic.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
from bench.bench_noise_overhead import Loop as OverheadLoop  # noqa: E402 - after the path


def _trainer_modules() -> list[str]:
    return [k for k in sys.modules if k == "trainer" or k.startswith("trainer.")]


def load_gradient_noise(root: str):
    """GradientNoise from `root`/trainer, loaded beside this checkout's (its modules leave sys.modules
    afterwards; the class keeps them alive through its globals)."""
    saved = {k: sys.modules.pop(k) for k in _trainer_modules()}
    sys.path.insert(0, root)
    try:
        return importlib.import_module("trainer.noise").GradientNoise
    finally:
        sys.path.remove(root)
        for k in _trainer_modules():
            del sys.modules[k]
        sys.modules.update(saved)


class Loop(OverheadLoop):
    """bench_noise_overhead's loop (its steps()) with `cls`, a GradientNoise class of any checkout (None:
    bare) built with `options`, and the CPU time inside step() counted apart."""

    def __init__(self, task, batches: list, cls=None, accum: int = 1, hooks_only: bool = False, **options):
        torch.manual_seed(0)
        self.task, self.batches, self.i, self.accum, self.hooks_only = task, batches, 0, accum, hooks_only
        self.model = task.build_model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.gns = None
        if cls is not None:
            names = cls.__init__.__globals__  # that code's trainer.noise module namespace
            rule_for = names["rule_for"]
            if hooks_only:
                names["rule_for"] = constant_rules(rule_for)
            try:
                self.gns = cls(self.model, warn=False, **options)
            finally:
                names["rule_for"] = rule_for
        self.in_step = 0.0  # thread CPU seconds inside step(), since the last read
        self.kept: list = []

    def measure(self, gns) -> None:  # step() alone timed too (or, hooks only, just reset)
        c0 = time.thread_time()
        if self.hooks_only:
            gns.reset()
        else:
            self.kept.append(gns.step())  # kept on the device, as a logging loop would
        self.in_step += time.thread_time() - c0


def constant_rules(rule_for):
    """rule_for whose rules return a cached 0 (the layer's fits check still applies)."""
    zero = torch.zeros(())

    def constant_rule_for(m, sketch: int = 0):
        return None if rule_for(m, sketch) is None else (lambda mod, a, d: zero)

    return constant_rule_for


def check_equal(a: Loop, b: Loop, n: int) -> None:
    """Run both loops n steps and require bitwise-equal ingredients and coverage on every step."""
    a.kept.clear(), b.kept.clear()
    a.steps(n), b.steps(n)
    for j, (sa, sb) in enumerate(zip(a.kept, b.kept, strict=True)):
        da, db = sa.as_dict(), sb.as_dict()
        same = da == db and (sa.complete, sa.per_example, sa.micro_batch, sa.missing) == (
            sb.complete, sb.per_example, sb.micro_batch, sb.missing)
        if not same:
            raise SystemExit(f"step {j}: old {sa} != new {sb}")
    a.kept.clear(), b.kept.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="a directory holding the other code's trainer/ (default: only this checkout)")
    ap.add_argument("--new", help="the same for the code under test (default: this checkout)")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--no-per-example", action="store_true", help="GradientNoise(per_example=False)")
    ap.add_argument("--hooks-only", action="store_true", help="rules return 0, reset() instead of step()")
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = load_gradient_noise(args.old) if args.old else None
    from trainer.noise import GradientNoise
    from trainer.tasks import TaskOptions, make_task

    if args.new:
        GradientNoise = load_gradient_noise(args.new)  # noqa: N806

    task = make_task(args.task, TaskOptions(), torch.device("cpu"), seed=0)
    batches = [task.next_batch(args.batch) for _ in range(8)]
    classes = {"bare": None} | ({"old": old} if old else {}) | {"new": GradientNoise}
    options = {"per_example": False} if args.no_per_example else {}
    loops = {name: Loop(task, batches, cls, args.accum, args.hooks_only, **options) for name, cls in classes.items()}
    if old and not args.hooks_only:
        check_equal(loops["old"], loops["new"], 20)
    warm = max(2, 2 * args.chunk)
    for f in loops.values():
        f.steps(warm)
        f.in_step = 0.0
    total: dict[str, list[float]] = {p: [] for p in loops}
    inside: dict[str, list[float]] = {p: [] for p in loops}
    orders = list(itertools.permutations(loops))
    for r in range(args.rounds):
        for p in orders[r % len(orders)]:
            f = loops[p]
            c0 = time.thread_time()
            f.steps(args.chunk)
            total[p].append((time.thread_time() - c0) / args.chunk)
            inside[p].append(f.in_step / args.chunk)
            f.in_step = 0.0

    def p10(v: list[float]) -> float:
        return sorted(v)[len(v) // 10] * 1e6

    mode = ("per_example=False" if args.no_per_example else "per-example norms") + (
        " (hooks only: rules return 0, reset() for step())" if args.hooks_only else "")
    print(f"# {args.task} B={args.batch}, K = {args.accum}, {mode}: p10 of thread CPU per step, "
          f"{args.rounds} x {args.chunk} steps"
          + (f"; old = {args.old}" + ("" if args.hooks_only else ", ingredients bitwise equal") if old else "") + (f"; new = {args.new}" if args.new else ""))
    bare = p10(total["bare"])
    for p in loops:
        step = "" if p == "bare" else f"   {'reset' if args.hooks_only else 'step'}() {p10(inside[p]):6.1f} us"
        print(f"{p:<5} {p10(total[p]):9.0f} us  {p10(total[p]) / bare:.3f}x{step}")


if __name__ == "__main__":
    main()
