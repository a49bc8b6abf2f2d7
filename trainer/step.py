"""One optimizer step's gradient: the batch's mean gradient in `p.grad`, and the noise-scale ingredients.

The batch runs as one pass (fast path, nothing measured) or as micro-batches: the K micro-batches of
gradient accumulation, or on a measurement step with K = 1 a split of the batch into 2 (same FLOPs).
Each micro-batch gradient g_k is kept just long enough to add its squared norm to a running sum, so the
ingredients cost a norm per micro-batch and nothing else. Everything stays on the device as 0-d tensors:
no `.item()`, no host-device sync.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepGrads:
    """Result of `compute_gradients`: device tensors, plus the host-side micro-batch sizes."""

    loss: torch.Tensor  # 0-d, mean loss over the batch (detached)
    g_small_sq: torch.Tensor | None  # mean over micro-batches of |g_k|^2; None when not measured
    b_small: float | None  # examples per small gradient (harmonic mean of the micro-batch sizes)
    g_big_sq: torch.Tensor | None  # |g_big|^2 of the whole batch's mean gradient (unclipped)
    b_big: float | None


_FLAT: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, torch.Tensor]] = weakref.WeakKeyDictionary()


def _flat_buffers(model: nn.Module, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat gradient-sized vectors per model, reused every step (the previous step's p.grad views
    into the first are overwritten, which is why the caller sets gradients to None before each step)."""
    n = sum(p.numel() for p in params)
    bufs = _FLAT.get(model)
    if bufs is None or bufs[0].numel() != n or bufs[0].dtype != params[0].dtype or bufs[0].device != params[0].device:
        bufs = tuple(torch.empty(n, dtype=params[0].dtype, device=params[0].device) for _ in range(2))
        _FLAT[model] = bufs
    return bufs


def compute_gradients(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                      n_micro: int = 1) -> StepGrads:
    """Set `p.grad` to the batch's mean-loss gradient, computed as `n_micro` micro-batches.

    With n_micro >= 2 the noise-scale ingredients are measured: g_small = each micro-batch's mean
    gradient (their *squared* norms are averaged), g_big = the combined mean gradient. Micro-batch k
    of size b_k gets weight w_k = b_k / B, so the result equals the full-batch gradient even for uneven
    splits, and E[mean_k |g_k|^2] = |G|^2 + tr(Sigma) * mean_k(1/b_k): hence b_small is the harmonic mean.
    The caller zeroes gradients first (`zero_grad(set_to_none=True)`) and clips, if at all, afterwards.
    """
    if n_micro <= 1:
        loss = loss_fn(model(x), y)
        loss.backward()
        return StepGrads(loss.detach(), None, None, None, None)

    params = [p for p in model.parameters() if p.requires_grad]
    if len({(p.dtype, p.device) for p in params}) > 1:
        raise NotImplementedError("micro-batch statistics need all parameters on one device with one dtype")
    batch = x.shape[0]
    xs, ys = x.tensor_split(n_micro), y.tensor_split(n_micro)
    weights = [xk.shape[0] / batch for xk in xs]
    if min(weights) == 0:
        raise ValueError(f"batch of {batch} cannot be split into {n_micro} non-empty micro-batches")
    # Each micro-batch gradient is copied into one flat vector, so one dot product gives its squared norm
    # (two kernels per micro-batch instead of several per parameter tensor), and the running sum of the
    # vectors becomes the batch gradient, handed to the parameters as views. The two vectors are kept
    # between steps: allocating them afresh costs page faults that show up in the step time.
    acc, scratch = _flat_buffers(model, params)
    equal = len(set(weights)) == 1  # the usual case: sum now, scale once at the end (fewer kernels)
    small_sq = loss_sum = None
    for k, (xk, yk, wk) in enumerate(zip(xs, ys, weights, strict=True)):
        loss_k = loss_fn(model(xk), yk)
        grads = torch.autograd.grad(loss_k, params, allow_unused=True)
        flat = acc if k == 0 else scratch
        torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                   for p, g in zip(params, grads, strict=True)], out=flat)  # g_k
        sq = torch.dot(flat, flat)  # |g_k|^2
        loss_k = loss_k.detach() if equal else loss_k.detach() * wk
        if k == 0:
            small_sq, loss_sum = sq, loss_k
            if not equal:
                acc.mul_(wk)
        else:
            acc.add_(flat, alpha=1.0 if equal else wk)
            small_sq, loss_sum = small_sq + sq, loss_sum + loss_k
    if equal:
        acc.mul_(weights[0])
        loss_sum = loss_sum * weights[0]
    offset = 0
    for p in params:
        p.grad = acc[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    b_small = n_micro / sum(1.0 / (w * batch) for w in weights)
    return StepGrads(loss_sum, small_sq / n_micro, b_small, torch.dot(acc, acc), float(batch))
