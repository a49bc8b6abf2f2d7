"""charlm with AdamW: trainer overhead vs a bare PyTorch AdamW loop, and the cost of --curvature.

    python bench/bench_charlm.py                          # defaults: context 64, 2 layers, width 128, B 32
    python bench/bench_charlm.py --device cuda --batch 256 --steps 200

Variants, each as time per step relative to the bare loop of the same repeat (median over repeats;
interleaved, so a busy machine skews both sides alike):
  loop        the trainer, nothing measured, its log calls dropped: the loop's own bookkeeping
  logging     the trainer, nothing measured (--gns-every 0), every step logged through the real collector
  noise       the trainer's defaults: plain ingredients on every step (per-example norms) and the
              Adam-preconditioned ones on every 10th step (run as 2 micro-batches)
  noise-plain as `noise` without the Adam-preconditioned measurement
  api-pe      the bare AdamW loop plus trainer.noise.GradientNoise(model) and its step() on every step
              (per-example norms of every layer, nothing else): the measurement without the trainer
Curvature: one CurvatureProbe measurement (sharpness + B_noise on the fixed sample) after 30 training
steps, cold (random start vector) and warm (started from the previous eigenvector), as a ratio to one
bare training step. Wall-clock and process CPU time are both reported.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import collector  # noqa: E402
import trainer.train as train_module  # noqa: E402
from bench.trainer_common import NullRun, device_label, interleave, noise_step, ratio, step_loop, sync  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.curvature import CurvatureProbe  # noqa: E402
from trainer.noise import GradientNoise  # noqa: E402
from trainer.tasks import TaskOptions, make_task  # noqa: E402
from trainer.train import make_optimizer, train  # noqa: E402

LR = 1e-3


def config(batch: int, steps: int, device: str, **kw) -> TrainConfig:
    return TrainConfig(task="charlm", batch=batch, lr=LR, optimizer="adamw", weight_decay=0.1, steps=steps,
                       eval_every=10**9, device=device, **kw)


def bare(task, batch: int, steps: int, device: str, noise: bool = False) -> tuple[float, float]:
    """The loop a user would write with the same model and AdamW: sample, forward, backward, step, and
    one evaluation at the end, as the trainer's run has; noise: plus GradientNoise(model).step()."""
    torch.manual_seed(0)
    model = task.build_model().to(task.device)
    opt = make_optimizer(config(batch, steps, device), model)
    gns = GradientNoise(model, warn=False) if noise else None
    def evaluate() -> None:
        _ = {k: float(v[0]) for k, v in task.evaluate(model).items()}

    out = step_loop(task, model, opt, batch, steps, after_backward=noise_step(gns),
                    after_loop=evaluate)
    if gns is not None:
        gns.close()
    return out


def trainer_run(task, batch: int, steps: int, device: str, db: Path | None, gns_every: int,
                adam: bool = True) -> tuple[float, float]:
    """`trainer.train` with the real collector, or none when db is None (its clock covers the loop and
    the final evaluation; process CPU time includes the collector's background thread)."""
    cfg = config(batch, steps, device, gns_every=gns_every)
    saved = train_module.ADAM_SPLIT_EVERY
    train_module.ADAM_SPLIT_EVERY = saved if adam else 10**12  # bench-only switch: no Adam measurement
    try:
        with (collector.start_run(db=db, name=f"bench-charlm-b{batch}", config=cfg.to_json()) if db is not None
              else contextlib.nullcontext(NullRun())) as run:
            c0 = time.process_time()
            result = train(cfg, task, run, progress=False)
            cpu = time.process_time() - c0
    finally:
        train_module.ADAM_SPLIT_EVERY = saved
    return result.seconds / result.steps, cpu / result.steps


def curvature_cost(task, batch: int, device: str) -> tuple[float, float, int, int]:
    """Seconds of a cold and a warm curvature measurement after 30 AdamW steps, and their HVP counts."""
    torch.manual_seed(0)
    model = task.build_model().to(task.device)
    opt = make_optimizer(config(batch, 30, device), model)
    step_loop(task, model, opt, batch, 30)

    class Quiet:
        def log(self, *a, **k) -> None:
            pass

    probe = CurvatureProbe(task.fixed_sample, task.curvature_examples)
    out = []
    for _ in range(2):
        sync(task.device)
        t0 = time.perf_counter()
        c = probe.log(Quiet(), model, task.loss_fn, 0)
        sync(task.device)
        out.append((time.perf_counter() - t0, c.sharpness.iterations))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--width", type=int, help="model width (default: the task's)")
    ap.add_argument("--context", type=int, help="characters per window (default: the task's)")
    ap.add_argument("--no-curvature", action="store_true", help="skip the curvature measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = make_task("charlm", TaskOptions(width=args.width, context=args.context), device, seed=0)
    dev = str(device)
    label = device_label(device)
    print(f"# {label}, torch {torch.__version__}, {args.threads} thread(s), {task.model_name}, B={args.batch}, "
          f"{args.steps} steps x {args.repeats} repeats", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        variants = {
            "bare": lambda: bare(task, args.batch, args.steps, dev),
            "loop": lambda: trainer_run(task, args.batch, args.steps, dev, None, gns_every=0),
            "logging": lambda: trainer_run(task, args.batch, args.steps, dev, db, gns_every=0),
            "noise": lambda: trainer_run(task, args.batch, args.steps, dev, db, gns_every=1),
            "noise-plain": lambda: trainer_run(task, args.batch, args.steps, dev, db, gns_every=1, adam=False),
            "api-pe": lambda: bare(task, args.batch, args.steps, dev, noise=True),
        }
        times = interleave(variants, args.repeats)
        curvature = None if args.no_curvature else curvature_cost(task, args.batch, dev)

    step_s = statistics.median(t[0] for t in times["bare"])  # includes 1/steps of an evaluation
    print(f"bare AdamW step: {step_s * 1e3:.1f} ms ({args.batch * task.tokens_per_example / step_s:,.0f} tokens/s)")
    print("| clock | loop, no store | logging only | noise every step (+ Adam every 10th) | noise, plain only "
          "| API per-example |")
    print("|---|---|---|---|---|---|")
    for clock, name in ((0, "wall"), (1, "cpu")):
        r = {v: ratio(times, v, "bare", clock) for v in variants if v != "bare"}
        print(f"| {name} | {r['loop']:.3f} | {r['logging']:.3f} | {r['noise']:.3f} | {r['noise-plain']:.3f} "
              f"| {r['api-pe']:.3f} |")
    if curvature is None:
        return
    cold, warm, n_cold, n_warm = curvature
    print(f"curvature per evaluation ({task.curvature_examples} windows, HVPs on half): cold {cold:.2f} s = "
          f"{cold / step_s:.0f} steps ({n_cold} power iterations), warm {warm:.2f} s = {warm / step_s:.0f} steps "
          f"({n_warm} power iterations)")


if __name__ == "__main__":
    main()
