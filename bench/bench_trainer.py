"""Trainer and GradientNoise overhead: time per step vs a bare PyTorch loop, same task, model, batch, process.

    python bench/bench_trainer.py                    # digits b32 and b512, charlm b32; CPU, 1 thread
    python bench/bench_trainer.py --device cuda --configs teacher:1024,charlm:64

Variants (time per step relative to the bare loop at the same batch size; lower is better):
  loop         trainer, nothing measured, log calls dropped: the training loop's own bookkeeping
  logging      trainer, nothing measured (--gns-every 0), every step logged through the real collector
  default      trainer with its defaults: noise scale on every step (per-example norms at K=1)
  every-10     trainer with --gns-every 10
  accum-k4     trainer with --accum 4 (micro-batch hooks, every step); vs the bare full-batch loop, and
               vs a bare 4-micro-batch accumulation loop (what a user who must accumulate runs anyway)
  api-pe       the bare loop plus trainer.noise.GradientNoise(model) and its step(): per-example norms
  api-k4       the bare 4-micro-batch loop plus GradientNoise(model, per_example=False)
  split-k1     the bare loop run as 2 micro-batches plus GradientNoise(per_example=False): the former
               K=1 method (same FLOPs, twice the launches)
  floor-hooks  the floor of api-pe's machinery: the bare loop plus the same hooks doing nothing (a forward
               pre-hook on the model, a forward hook per covered layer registering an empty pre-hook on
               its output's gradient node)
  floor-math   the floor of api-pe's arithmetic: the bare loop plus the per-example rules applied to one
               fixed (input, output gradient) pair per layer, and the norm of `.grad`, with no hooks
  per-example  reference: bare loop computing exact per-example gradients with torch.func (vmap(grad))
The variants are interleaved and repeated; each ratio is the median over repeats of (variant time /
bare time from the same repeat), so a busy machine skews both sides alike. Both wall-clock and process
CPU time are reported: on a shared machine the CPU-time ratios are the steadier ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import collector  # noqa: E402
from bench.trainer_common import NullRun, device_label, interleave, noise_step, ratio, step_loop, sync  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.noise import GradientNoise, _sq_norm  # noqa: E402
from trainer.per_example import rule_for  # noqa: E402
from trainer.tasks import TaskOptions, make_task  # noqa: E402
from trainer.train import train  # noqa: E402


def bare(task, batch: int, steps: int, accum: int = 1, noise: dict | None = None) -> tuple[float, float]:
    """The loop a user would write: sample, forward, backward (K micro-batches), step. Seconds per step.

    noise: GradientNoise options; then its step() runs after each backward and the ingredients are kept
    on the device (as a user's loop would hand them to run.log_step in blocks).
    """
    torch.manual_seed(0)
    model = task.build_model().to(task.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gns = GradientNoise(model, warn=False, **noise) if noise is not None else None
    out = step_loop(task, model, opt, batch, steps, accum, noise_step(gns))
    if gns is not None:
        gns.close()
    return out


def per_example(task, batch: int, steps: int) -> float:
    """Exact per-example gradients (torch.func), their mean for the update and the norms for the noise scale."""
    torch.manual_seed(0)
    model = task.build_model().to(task.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss_one(params, xi, yi):
        return task.loss_fn(functional_call(model, params, (xi[None],)), yi[None])

    per_ex = vmap(grad(loss_one), in_dims=(None, 0, 0))
    sync(task.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x, y = task.next_batch(batch)
        params = {n: p.detach() for n, p in model.named_parameters()}
        grads = per_ex(params, x, y)
        sq = sum(g.reshape(batch, -1).square().sum(1) for g in grads.values())  # |g_i|^2 per example
        _ = sq.mean()
        for n, p in model.named_parameters():
            p.grad = grads[n].mean(0)
        opt.step()
    sync(task.device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def _covered(model: nn.Module) -> list[nn.Module]:
    gns = GradientNoise(model, warn=False)
    names = set(gns.covered)
    gns.close()
    return [m for n, m in model.named_modules() if n in names]


def floor_hooks(task, batch: int, steps: int) -> tuple[float, float]:
    """The bare loop plus GradientNoise's hooks, doing nothing: what the hook machinery costs alone."""
    torch.manual_seed(0)
    model = task.build_model().to(task.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def on_output(module, inputs, output):
        if output.grad_fn is not None:
            output.grad_fn.register_prehook(lambda grads: None)

    handles = [m.register_forward_hook(on_output) for m in _covered(model)]
    handles.append(model.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True))
    try:
        return step_loop(task, model, opt, batch, steps)
    finally:
        for h in handles:
            h.remove()


def floor_math(task, batch: int, steps: int) -> tuple[float, float]:
    """The bare loop plus the per-example arithmetic alone: each covered layer's rule on one fixed
    (input, output gradient) pair captured up front, their sum, and the norm of `.grad`; no hooks."""
    torch.manual_seed(0)
    model = task.build_model().to(task.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pairs, handles = [], []
    for m in _covered(model):
        def keep(module, inputs, output, m=m):
            output.register_hook(lambda d: pairs.append((m, rule_for(m), inputs[0].detach(), d.detach())))
        handles.append(m.register_forward_hook(keep))
    x, y = task.next_batch(batch)
    task.loss_fn(model(x), y).backward()
    for h in handles:
        h.remove()
    params = [p for p in model.parameters() if p.requires_grad]

    def extra() -> None:
        terms = [rule(m, a, d) for m, rule, a, d in pairs]
        _ = torch.stack(terms).sum().mul_(float(batch)), _sq_norm([p.grad for p in params], 1.0)

    return step_loop(task, model, opt, batch, steps, after_backward=extra)


def trainer_run(task_name: str, task, batch: int, steps: int, db: Path | None, device: str,
                **options) -> tuple[float, float]:
    """`trainer.train` with the real collector; its own clock covers the loop (plus the final sync/eval).

    CPU time is the whole process's, so the collector's background thread (spooling, DuckDB writes)
    is counted even when it runs on another core.
    """
    cfg = TrainConfig(task=task_name, batch=batch, lr=0.01, steps=steps, eval_every=10**9, device=device,
                      gns_every=options.pop("gns_every", 0), **options)
    if db is None:
        c0 = time.process_time()
        result = train(cfg, task, NullRun(), progress=False)
        cpu = time.process_time() - c0
        return result.seconds / result.steps, cpu / result.steps
    with collector.start_run(db=db, name=f"bench-{task_name}-b{batch}", config=cfg.to_json()) as run:
        c0 = time.process_time()
        result = train(cfg, task, run, progress=False)
        cpu = time.process_time() - c0
    return result.seconds / result.steps, cpu / result.steps


def bench_config(task_name: str, batch: int, steps: int, repeats: int, device: torch.device, data_dir, db: Path):
    task = make_task(task_name, TaskOptions(data_dir=data_dir), device, seed=0)
    dev = str(device)
    variants = {
        "bare": lambda: bare(task, batch, steps),
        "loop": lambda: trainer_run(task_name, task, batch, steps, None, dev, gns_every=0),
        "logging": lambda: trainer_run(task_name, task, batch, steps, db, dev, gns_every=0),
        "default": lambda: trainer_run(task_name, task, batch, steps, db, dev, gns_every=1),
        "every-10": lambda: trainer_run(task_name, task, batch, steps, db, dev, gns_every=10),
        "accum-k4": lambda: trainer_run(task_name, task, batch, steps, db, dev, accum=4),
        "bare-k4": lambda: bare(task, batch, steps, accum=4),
        "api-pe": lambda: bare(task, batch, steps, noise={}),
        "api-k4": lambda: bare(task, batch, steps, accum=4, noise={"per_example": False}),
        "split-k1": lambda: bare(task, batch, steps, accum=2, noise={"per_example": False}),
        "floor-hooks": lambda: floor_hooks(task, batch, steps),
        "floor-math": lambda: floor_math(task, batch, steps),
        "per-example": lambda: per_example(task, batch, max(steps // 4, 10)),
    }
    times = interleave(variants, repeats)
    out = {"task": task_name, "batch": batch, "steps": steps, "repeats": repeats,
           "bare_steps_per_s": 1.0 / statistics.median(t[0] for t in times["bare"]),
           "bare_cpu_us": 1e6 * statistics.median(t[1] for t in times["bare"])}
    for clock, suffix in ((0, "wall"), (1, "cpu")):
        out[suffix] = {name.replace("-", "_"): ratio(times, name, "bare", clock) for name in variants if name != "bare"}
        out[suffix]["k4_vs_bare_k4"] = ratio(times, "accum-k4", "bare-k4", clock)
        out[suffix]["api_k4_vs_bare_k4"] = ratio(times, "api-k4", "bare-k4", clock)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="digits:32,digits:512,charlm:32", help="task:batch,...")
    ap.add_argument("--steps", type=int, default=600, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    label = device_label(device)
    print(f"# {label}, torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps x {args.repeats} repeats",
          flush=True)
    print("| task | B | bare steps/s | clock | loop, no store | logging only | default (every step) | every 10th "
          "| K=4 (vs bare K=4) | API per-example | API K=4 (vs bare K=4) | 2-way split | floor: hooks "
          "| floor: math | torch.func |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.configs.split(","):
            task_name, batch = spec.split(":")
            results.append(bench_config(task_name, int(batch), args.steps, args.repeats, device, args.data_dir,
                                        Path(tmp) / "bench.duckdb"))
            r = results[-1]
            for clock in ("wall", "cpu"):
                c = r[clock]
                print(f"| {r['task']} | {r['batch']} | {r['bare_steps_per_s']:.0f} | {clock} | {c['loop']:.3f} | "
                      f"{c['logging']:.3f} | {c['default']:.3f} | {c['every_10']:.3f} | "
                      f"{c['accum_k4']:.3f} ({c['k4_vs_bare_k4']:.3f}) | {c['api_pe']:.3f} | "
                      f"{c['api_k4']:.3f} ({c['api_k4_vs_bare_k4']:.3f}) | {c['split_k1']:.3f} | "
                      f"{c['floor_hooks']:.3f} | {c['floor_math']:.3f} | {c['per_example']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
