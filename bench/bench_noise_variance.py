"""What a cheaper per-example mode costs in noise: the spread of one step's ingredients, exact vs
`GradientNoise(sketch=k)`, at fixed parameters partway through training.

    python bench/bench_noise_variance.py                      # charlm, B = 32, 60 AdamW steps first
    python bench/bench_noise_variance.py --sketches 2,4,8 --batches 12 --draws 6

The model is trained `--warm` steps with AdamW (a realistic point, not the initialisation), then frozen.
For each of `--batches` fixed batches, every mode measures the same backward `--draws` times (the exact
mode's draws are identical). Reported per mode: the relative spread of g_small_sq between draws at a fixed
batch (the mode's own noise) and over all batches and draws (what a running estimate averages), the same
for the per-step tr(Sigma), and the variance of tr(Sigma) relative to the exact mode's: about how many
more steps a window needs for the same precision (measuring only every k-th step exactly costs k x, for
1 + (exact overhead) / k of the time). The means over everything show no bias beyond noise.
Commit 4d18525 also had `--samples` (GradientNoise(sample=m): the norms of m random examples per batch);
measured dominated by every-k-th-step measurement, it was reverted (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def measure(model, loss_fn, batches, draws: int, **opts) -> np.ndarray:
    """(batches, draws, 2): g_small_sq and tr(Sigma) of each draw at each batch."""
    from trainer.noise import GradientNoise

    out = np.zeros((len(batches), draws, 2))
    with GradientNoise(model, warn=False, **opts) as gns:
        for b, (x, y) in enumerate(batches):
            for r in range(draws):
                model.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                s = gns.step()
                out[b, r] = float(s.g_small_sq), float(s.tr_sigma)
    model.zero_grad(set_to_none=True)
    return out


def spread(v: np.ndarray) -> tuple[float, float]:
    """(relative std between draws at a fixed batch, relative std over everything)."""
    mean = abs(v.mean())
    return float(np.sqrt(v.var(axis=1, ddof=1).mean()) / mean), float(v.std(ddof=1) / mean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="charlm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warm", type=int, default=60, help="AdamW steps before the parameters are frozen")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--sketches", default="8", help="GradientNoise(sketch=k) values, comma-separated")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trainer.tasks import TaskOptions, make_task

    torch.set_num_threads(1)
    task = make_task(args.task, TaskOptions(), torch.device("cpu"), seed=0)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(args.warm):
        x, y = task.next_batch(args.batch)
        opt.zero_grad(set_to_none=True)
        task.loss_fn(model(x), y).backward()
        opt.step()
    batches = [task.next_batch(args.batch) for _ in range(args.batches)]
    modes = {"exact": {}} | {f"sketch={k}": {"sketch": int(k)} for k in args.sketches.split(",") if k}
    got = {name: measure(model, task.loss_fn, batches, args.draws, **opts) for name, opts in modes.items()}
    ref_var = got["exact"][..., 1].var(ddof=1)
    print(f"# {args.task} B={args.batch}, after {args.warm} AdamW steps; {args.batches} batches x {args.draws} draws")
    print("| mode | g_small_sq: at a fixed batch / overall | tr(Sigma): at a fixed batch / overall "
          "| tr(Sigma) variance vs exact | mean g_small_sq vs exact |")
    print("| --- | --- | --- | --- | --- |")
    exact_mean = got["exact"][..., 0].mean()
    for name, v in got.items():
        (gf, go), (tf, to) = spread(v[..., 0]), spread(v[..., 1])
        print(f"| {name} | {gf:.1%} / {go:.1%} | {tf:.1%} / {to:.1%} | {v[..., 1].var(ddof=1) / ref_var:.2f}x "
              f"| {v[..., 0].mean() / exact_mean:.3f} |")


if __name__ == "__main__":
    main()
