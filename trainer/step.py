"""One optimizer step's gradient: the batch's mean gradient in `p.grad`, and the noise-scale ingredients.

The batch runs as one pass or as micro-batches (the K micro-batches of gradient accumulation, or a
split in two at K = 1 for models with layers the per-example rules do not cover). The ingredients
come from the hooks of a `GradientNoise` (trainer/noise.py): per-example norms as autograd produces
the layer output gradients, or each micro-batch's squared norm as it reaches a parameter. No copy of
the gradient, and everything stays on the device as 0-d tensors: no `.item()`, no host-device sync.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainer.noise import GradientNoise, NoiseStats

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepGrads:
    """Result of `compute_gradients`: device tensors, plus the host-side batch sizes."""

    loss: torch.Tensor  # 0-d, mean loss over the batch (detached)
    g_small_sq: torch.Tensor | None  # |g_small|^2 (see NoiseStats); None when not measured
    b_small: float | None  # 1 with per-example norms; else the harmonic mean of the micro-batch sizes
    g_big_sq: torch.Tensor | None  # |g_big|^2 of the whole batch's mean gradient (unclipped)
    b_big: float | None
    complete: bool = True  # False: some parameters had no small batch (then nothing is reported)


_MICRO: weakref.WeakKeyDictionary[nn.Module, GradientNoise] = weakref.WeakKeyDictionary()


def compute_gradients(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                      n_micro: int = 1, noise: GradientNoise | None = None) -> StepGrads:
    """Set `p.grad` to the batch's mean-loss gradient, computed as `n_micro` micro-batches.

    Micro-batch k of size b_k is weighted b_k / B, so the result equals the full-batch gradient even
    for uneven splits. `noise` (hooks on `model`) measures the ingredients when it is active; without
    one, n_micro >= 2 measures by micro-batches (a GradientNoise kept per model).
    The caller zeroes gradients first (`zero_grad(set_to_none=True)`) and clips, if at all, afterwards.
    """
    if noise is None and n_micro > 1:
        noise = _MICRO.get(model)
        if noise is None:
            noise = _MICRO[model] = GradientNoise(model, per_example=False, accumulation=True)
    measure = noise is not None and noise.active
    if n_micro <= 1:
        loss = loss_fn(model(x), y)
        loss.backward()
        loss, weights = loss.detach(), [1.0]
    else:
        batch = x.shape[0]
        xs, ys = x.tensor_split(n_micro), y.tensor_split(n_micro)
        weights = [xk.shape[0] / batch for xk in xs]
        if min(weights) == 0:
            raise ValueError(f"batch of {batch} cannot be split into {n_micro} non-empty micro-batches")
        loss = None
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        for i, (xk, yk, wk) in enumerate(zip(xs, ys, weights, strict=True)):
            # DDP: all-reduce once, in the last micro-batch's backward (no_sync accumulates locally)
            with model.no_sync() if ddp and i < n_micro - 1 else contextlib.nullcontext():
                loss_k = loss_fn(model(xk), yk) * wk
                loss_k.backward()
            loss = loss_k.detach() if loss is None else loss + loss_k.detach()
    if not measure:
        return StepGrads(loss, None, None, None, None)
    s: NoiseStats = noise.step(loss_scale=weights, examples=x.shape[0])
    if not s.complete:
        return StepGrads(loss, None, None, None, None, complete=False)
    return StepGrads(loss, s.g_small_sq, s.b_small, s.g_big_sq, s.b_big)
