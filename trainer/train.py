"""The training loop, readable top to bottom (in the spirit of nanoGPT's train.py).

    task = make_task(...); with collector.start_run(...) as run: result = train(cfg, task, run)

Per optimizer step: pick this step's batch size and LR from the schedules, draw the batch, compute the
mean gradient (as K micro-batches with --accum K) while the hooks of a GradientNoise (trainer/noise.py)
take the noise-scale ingredients, optionally clip, step the optimizer. Statistics stay on the device and
reach the host every few steps (trainer/steplog.py), where the run is checked for divergence and for the
target loss.

Under torchrun (trainer/ddp.py) the model is wrapped in DistributedDataParallel, each rank trains on its
shard of every global batch, the noise scale compares each rank's gradient with the all-reduced one,
and only rank 0 evaluates and writes (the other ranks get a `NullRun`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from collector import signals
from trainer.adam_noise import ADAM_SPLIT_EVERY, AdamNoise, AdamNoiseLog, split_sizes
from trainer.config import Plan, TrainConfig, adam_betas, plan
from trainer.curvature import CurvatureProbe
from trainer.ddp import DistEnv, shard
from trainer.gns import BSimpleEMA, ExampleEMA, TrackingBSimple
from trainer.noise import GradientNoise
from trainer.step import compute_gradients
from trainer.steplog import GNS_TARGET_RSE, StepLog
from trainer.tasks import Task

LOSS_SMOOTHING_STEPS = 10  # --target-loss compares an EMA of the training loss over ~10 steps
GNS_SPLIT = 2  # micro-batches a K = 1 measurement step is split into when a layer has no per-example rule


@dataclass
class TrainResult:
    """How the run ended, for the command line's summary (everything else is in the store)."""

    status: str  # finished | diverged
    steps: int
    examples: int
    seconds: float
    final_loss: float  # smoothed training loss
    b_simple: float
    reached_target: bool
    evals: dict[str, tuple[float, float | None]]


class LossWatch:
    """Smoothed training loss on the host: decides when a run has diverged or reached its target."""

    def __init__(self, target: float | None, diverge_factor: float):
        self.target, self.factor = target, diverge_factor
        self.ema = ExampleEMA(LOSS_SMOOTHING_STEPS)  # one "example" per step: an EMA over ~10 steps
        self.first: float | None = None
        self.diverged = self.reached = False

    def feed(self, rows: dict, run) -> None:
        """Check new rows in order; stop at the first divergence (non-finite or exploding loss)."""
        if not rows:
            return
        for step, loss in zip(rows["step"].tolist(), rows["loss"].tolist(), strict=True):
            self.first = loss if self.first is None else self.first
            self.ema.update(loss, 1)
            exploded = self.factor and self.first > 0 and self.ema.value > self.factor * self.first
            if not math.isfinite(loss) or exploded:
                self.diverged = True
                run.log(step, diverged=1.0)
                return
            if self.target is not None and not self.reached and self.ema.value <= self.target:
                self.reached = True
                run.log(step, target_reached=1.0)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (with momentum and weight decay), Adam (L2 penalty, momentum is beta1) or AdamW.

    AdamW decays only weight matrices and embeddings (parameters of 2+ dimensions), not biases or
    LayerNorm gains, as GPT-style training does: decaying a gain towards 0 fights the normalisation.
    """
    if cfg.optimizer == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=adam_betas(cfg), eps=cfg.eps)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=adam_betas(cfg), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum or 0.0,
                           weight_decay=cfg.weight_decay)


def sync_every(device: torch.device) -> int:
    """Steps between host reads: cheap on the CPU (no transfer), batched on an accelerator."""
    return 25 if device.type == "cpu" else 50


def log_evals(run, task: Task, model: nn.Module, step: int, examples: int, probe: CurvatureProbe | None = None,
              noise: GradientNoise | None = None) -> dict[str, tuple[float, float | None]]:
    """Evaluate on every split (one host sync per evaluation, not per step) and log it; with --curvature
    also the sharpness and B_noise on the task's fixed sample (with `noise`'s hooks paused: the probe's
    backward passes are not part of a training step)."""
    if probe is not None:
        was, noise_on = (noise.active, True) if noise is not None else (False, False)
        if noise_on:
            noise.active = False
        try:
            probe.log(run, model, task.loss_fn, step)
        finally:
            if noise_on:
                noise.active = was
    results = {}
    for split, (loss, acc) in task.evaluate(model).items():
        results[split] = (float(loss), None if acc is None else float(acc))
    if task.exact_eval is not None:  # linreg: the exact population loss and noise scale
        exact = task.exact_eval(model)
        results["population"] = (exact["loss"], None)
        run.log(step, delta_sq=exact["delta_sq"], b_simple_exact=exact["b_simple_exact"])
    for split, (loss, acc) in results.items():
        run.log_eval(step, split=split, loss=loss, accuracy=acc, examples=examples)
    return results


def train(cfg: TrainConfig, task: Task, run, progress: bool | None = None, env: DistEnv | None = None) -> TrainResult:
    """Train `task` as configured, logging every step and evaluation to `run` (a collector Run; under DDP
    `env` is this rank's place, and `run` a NullRun on every rank but 0)."""
    env = env or DistEnv()
    device = task.device
    p: Plan = plan(cfg, task.train_size, env.world)
    torch.manual_seed(cfg.seed)  # the same initial parameters on every rank (DDP broadcasts rank 0's anyway)
    model = task.build_model().to(device)
    model.train()
    opt = make_optimizer(cfg, model)
    net: nn.Module = model  # what the training step calls: the DDP wrapper under torchrun
    if env.active:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # a test hook: rank 1 dies (as if killed) at this step, to show that rank 0's run ends failed
    die_at = int(os.environ.get("BATCHSCOPE_TEST_DIE_AT_STEP", "0") or 0) if env.rank == 1 else 0
    # per-example norms (B_small = 1) from layer hooks, in the same pass; parameters of layers without a
    # rule (and --gns-method micro-batch) use each micro-batch's norm from parameter hooks, which at K = 1
    # needs the batch run as 2 micro-batches
    per_example = cfg.gns_method == "per-example" or (cfg.gns_method == "auto" and cfg.accum == 1)
    noise = (GradientNoise(net, per_example=per_example, warn=False, sketch=cfg.gns_sketch,
                           accumulation=cfg.accum > 1)
             if p.gns_every > 0 else None)
    # under DDP each rank's gradient is a small batch already: no split
    split = GNS_SPLIT if noise is not None and (noise.fallback or not per_example) and not env.active else 1
    # Adam: the preconditioned ingredients too, on steps run as micro-batches (trainer/adam_noise.py);
    # under DDP every rank's local gradient is a small batch already (its hooks sit on the bare model)
    adam = (AdamNoise(model, world=env.world) if cfg.optimizer in ("adam", "adamw") and p.gns_every > 0
            else None)
    adam_log = AdamNoiseLog(p.gns_window)
    probe = CurvatureProbe(task.fixed_sample, task.curvature_examples) if cfg.curvature and env.writes else None
    gns = BSimpleEMA(p.gns_window) if cfg.gns_window else TrackingBSimple(GNS_TARGET_RSE)
    log = StepLog(run, device, gns, sync_every(device), world=env.world)
    watch = LossWatch(cfg.target_loss, cfg.diverge_factor)
    by_steps = p.max_steps is not None and (p.max_examples is None)
    bar = tqdm(total=p.max_steps if by_steps else p.max_examples, unit="step" if by_steps else "ex",
               disable=not env.writes or (not sys.stderr.isatty() if progress is None else not progress),
               desc=run.name if hasattr(run, "name") else None, leave=False, dynamic_ncols=True)
    evals: dict = {}
    step = examples = bar_pos = last_eval = 0
    change_at, batch, lr = 0, cfg.batch, cfg.lr
    share_logged = noise is None  # gns_per_example is logged once, at the first measured step
    t0 = time.perf_counter()

    max_steps = math.inf if p.max_steps is None else p.max_steps
    max_examples = math.inf if p.max_examples is None else p.max_examples
    try:
        while step < max_steps and examples < max_examples:
            if examples >= change_at:  # this step's hyperparameters, from the examples seen so far
                batch, lr = p.batch_at(cfg.batch, examples, cfg.accum * env.world), cfg.lr * p.lr.multiplier(examples)
                for group in opt.param_groups:
                    group["lr"] = lr
                change_at = p.next_change(examples)
            measure = noise is not None and batch >= 2 and (cfg.accum > 1 or (step + 1) % p.gns_every == 0)
            n_micro = cfg.accum if cfg.accum > 1 else (split if measure else 1)

            adam_step = (adam is not None and batch >= 2 and (cfg.accum > 1 or (step + 1) % ADAM_SPLIT_EVERY == 0)
                         and adam.begin(opt))
            n_micro = max(n_micro, 2) if adam_step and not env.active else n_micro

            # forward/backward (as micro-batches when measuring or accumulating), then the update
            x, y = shard(env, *task.next_batch(batch))  # every rank draws the global batch, keeps its slice
            opt.zero_grad(set_to_none=True)
            if noise is not None:
                noise.active = measure
            if step + 1 == die_at:
                os._exit(3)
            grads = compute_gradients(net, task.loss_fn, x, y, n_micro, noise)
            if measure and not share_logged:  # after the first forward: run-time fallbacks are known
                run.log(step + 1, gns_per_example=noise.per_example_share())
                share_logged = True
            if not grads.complete:  # a layer fell back at run time (e.g. an input without a batch dim)
                split = GNS_SPLIT
            if adam_step:
                adam_log.add(step + 1, examples + batch, adam.step(split_sizes(x.shape[0], n_micro)))
            if cfg.clip_grad:  # after measuring: the noise scale is defined on the unclipped gradient
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            with signals.deferred():  # a SIGTERM/SIGINT here acts after the row of the update it applied
                opt.step()
                step += 1
                examples += batch
                log.add(step, examples, batch, lr, time.perf_counter() - t0, grads)

            # host side, every few steps: divergence, target loss, progress
            if log.due():
                rows = log.sync()
                adam_log.flush(run)
                watch.feed(rows, run)
                if not bar.disable:
                    bar.update((step if by_steps else examples) - bar_pos)
                    bar_pos = step if by_steps else examples
                    bar.set_postfix(loss=f"{watch.ema.value:.4g}", b_simple=f"{gns.value:.4g}", refresh=False)
                if watch.diverged or watch.reached:
                    break
            if step % p.eval_every == 0 and env.writes:
                evals, last_eval = log_evals(run, task, model, step, examples, probe, noise), step
    except BaseException:  # Ctrl-C or a crash: keep every step trained so far, then let the run fail
        # deferred: a SIGTERM arriving now (torchrun stopping this rank after another failed) acts after the
        # rows are handed over, not between a sync and its emit; its exception is suppressed, the crash raised
        with contextlib.suppress(Exception), signals.deferred():
            log.emit()  # the blocks already on the host first: the sync below may fail
            last = log.sync(collective=False)  # under DDP the peers may be gone: no all-reduce now
            log.emit()
            if env.active and env.writes and last:
                print(f"batchscope: the last {len(last['step'])} steps are stored without their loss (it is "
                      "the ranks' mean, and the ranks did not reduce it before training stopped)",
                      file=sys.stderr, flush=True)
            if env.writes and log.dropped:
                print(f"batchscope: the last {log.dropped} steps are not stored: under DDP on CUDA their "
                      "values wait on a stream that a failed rank may have stalled", file=sys.stderr, flush=True)
            adam_log.flush(run)
        bar.close()
        raise

    rows = log.sync()  # the last few steps (fewer than sync_every)
    if not (watch.diverged or watch.reached):
        watch.feed(rows, run)
    log.emit()
    adam_log.flush(run)
    status = "diverged" if watch.diverged else "finished"
    if status != "diverged" and last_eval != step and env.writes:
        evals = log_evals(run, task, model, step, examples, probe, noise)
    bar.close()
    return TrainResult(status, step, examples, time.perf_counter() - t0, watch.ema.value, gns.value, watch.reached,
                       evals)
