"""One optimizer step's noise ingredients (`NoiseStats`), what GradientNoise's hooks collect for it
(`_Step`), and the reductions that form the one from the other.

Kept apart from trainer/noise.py's hooks: plain state and pure tensor arithmetic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class NoiseStats:
    """One optimizer step's ingredients. Tensors stay on the device (no host sync until `as_dict`)."""

    g_small_sq: torch.Tensor | None  # E = |G|^2 + tr(Sigma)/b_small; None when nothing was measurable
    b_small: float | None
    g_big_sq: torch.Tensor | None  # |g_big|^2 of the step's mean gradient over all ranks
    b_big: float | None
    complete: bool = True  # every parameter with a gradient is in the estimate
    per_example: tuple[str, ...] = ()  # parameters measured by per-example norms this step
    micro_batch: tuple[str, ...] = ()  # parameters measured by micro-batch (or per-rank) norms
    missing: tuple[str, ...] = ()  # parameters with a gradient but no small batch (K = 1, one device)
    micro_batches: int = 0
    examples: int = 0  # examples in the big batch (all ranks)
    ranks_examples: torch.Tensor | None = None  # under DDP/FSDP: the ranks' examples added up (checked in as_dict)

    @property
    def measured(self) -> bool:
        return self.g_small_sq is not None

    @property
    def g_sq(self) -> torch.Tensor | None:
        """Unbiased |G|^2 of this step (noisy, may be negative)."""
        if not self.measured:
            return None
        return (self.b_big * self.g_big_sq - self.b_small * self.g_small_sq) / (self.b_big - self.b_small)

    @property
    def tr_sigma(self) -> torch.Tensor | None:
        """Unbiased tr(Sigma) of this step."""
        if not self.measured:
            return None
        return (self.g_small_sq - self.g_big_sq) / (1.0 / self.b_small - 1.0 / self.b_big)

    def as_dict(self) -> dict[str, float]:
        """The four `steps` columns as floats (one host sync); empty when nothing was measured."""
        if not self.measured:
            return {}
        out = {"g_small_sq": float(self.g_small_sq), "b_small": float(self.b_small),
               "g_big_sq": float(self.g_big_sq), "b_big": float(self.b_big)}
        if self.ranks_examples is not None and not _UNEVEN:
            n = float(self.ranks_examples)
            if n >= 0 and abs(n - self.b_big) > 0.5:
                _UNEVEN.append(n)
                warnings.warn(f"GradientNoise: the ranks' local batches differ ({n:.0f} examples in all, while this "
                              f"rank's b_big = {self.b_big:.0f} assumes every rank has its own count): the ingredients "
                              "assume equal local batches; make them equal (DistributedSampler, drop_last)",
                              RuntimeWarning, stacklevel=2)
        return out


_UNEVEN: list[float] = []  # said once per process


def _weighted(terms: list[torch.Tensor], micro: list[int], weights: list[float], squared: bool,
              like: torch.Tensor) -> torch.Tensor:
    """sum_j w[micro_j] x_j (x_j^2 with squared=True), micro-batches counted from 1: one stack, one
    reduction, one scale when the weights are equal (the common case)."""
    k = len(weights)
    if terms and (min(micro) < 1 or max(micro) > k):
        keep = [j for j, m in enumerate(micro) if 0 < m <= k]
        terms, micro = [terms[j] for j in keep], [micro[j] for j in keep]
    if not terms:
        return torch.zeros((), device=like.device)
    w0 = weights[0]
    if weights.count(w0) == k:
        if len(terms) == 1:
            t = terms[0]
            return (t * t).mul_(_scalar(w0, t.dtype)) if squared else t * _scalar(w0, t.dtype)
        if len(terms) == 2 and not squared:
            t = torch.add(terms[0], terms[1])
            return t.mul_(_scalar(w0, t.dtype))
        v = torch.stack(terms)
        t = torch.dot(v, v) if squared else v.sum()
        return t.mul_(_scalar(w0, t.dtype))
    v = torch.stack(terms)
    return weighted_sum(v * v if squared else v, [weights[m - 1] for m in micro])


_SCALARS: dict[tuple[float, torch.dtype], torch.Tensor] = {}


def _scalar(w: float, dtype: torch.dtype) -> torch.Tensor:
    """w as a cached 0-d CPU tensor of `dtype`, to scale a tensor of that dtype by: a Python float is wrapped
    into a new tensor on every product (~2 us of a 0-d product on the CPU); cast to the dtype, as a float
    operand is, the product is the same to the bit."""
    key = (w, dtype)
    s = _SCALARS.get(key)
    if s is None:
        if len(_SCALARS) > 256:  # weights that change every step (a varying loss scale): stay bounded
            _SCALARS.clear()
        s = _SCALARS[key] = torch.tensor(w, dtype=dtype)
    return s


def weighted_sum(v: torch.Tensor, w: list[float]) -> torch.Tensor:
    """sum_j w_j v_j of a 1-d tensor: one reduction and a scale when the weights are equal, else one dot."""
    if all(x == w[0] for x in w):
        return v.sum() * w[0]
    return torch.dot(v, torch.tensor(w, dtype=v.dtype, device=v.device))


def _sq_norm(grads: list[torch.Tensor], scale: float) -> torch.Tensor:
    """scale * |g|^2 over several tensors (torch's fused per-tensor norms, then one dot)."""
    norms = torch._foreach_norm(grads)
    norms = norms[0].reshape(1) if len(norms) == 1 else torch.stack(norms)
    if norms.dtype not in (torch.float32, torch.float64):
        norms = norms.float()
    sq = torch.dot(norms, norms)
    return sq if scale == 1.0 else sq.mul_(_scalar(scale, sq.dtype))


class _Step:
    """What the hooks collected since the last `step()`: plain lists, cleared in place (no per-step
    allocation beyond the tensors themselves)."""

    __slots__ = ("micro", "sizes", "shape", "calls", "pe", "pe_micro", "pe_mod", "mb", "mb_micro", "rk", "lost",
                 "comm", "synced", "rk_void", "tied", "hooked", "fired", "first_task", "root_task")

    def __init__(self) -> None:
        self.sizes: list[int] = []  # examples per micro-batch
        self.calls: dict[int, int] = {}  # covered module id -> calls in this forward
        self.pe: list[torch.Tensor] = []  # sum_i |contribution_i|^2 of a layer in one micro-batch
        self.pe_micro: list[int] = []  # ... and that micro-batch (counted from 1)
        self.pe_mod: list[int] = []  # ... and that layer (module id)
        self.mb: list[torch.Tensor] = []  # |h_k| of one parameter in one micro-batch (a norm, not squared)
        self.mb_micro: list[int] = []
        self.rk: list[torch.Tensor] = []  # this rank's |local gradient|^2 of un-ruled parameters, per DDP bucket
        self.lost: set[int] = set()  # parameters that left the per-example method part-way through the step
        self.tied: dict = {}  # a tied Embedding's ids and each side's piece of the cross term, per micro-batch
        self.hooked: set[tuple[int, int]] = set()  # (layer, micro-batch) whose output gradient was hooked
        self.fired: set[tuple[int, int]] = set()  # ... and whose hook ran
        self.first_task: dict[int, int] = {}  # layer -> autograd graph task of its first call this forward
        self.clear()

    def clear(self) -> None:
        self.micro = 0  # forward passes with grad enabled (= micro-batches)
        self.comm = None  # the sums' all-reduce, launched by the DDP communication hook (noise_comm.py)
        self.synced = False  # DDP all-reduced this step's gradients (its last bucket went)
        self.rk_void = False  # ... more than once: the buckets held reduced + local gradients, not local ones
        self.shape: tuple[int, ...] | None = None  # shape of the model's first tensor input, this forward
        self.root_task = -1  # the graph task of the last counted forward (-1: outside a backward pass)
        for c in (self.sizes, self.calls, self.pe, self.pe_micro, self.pe_mod, self.mb, self.mb_micro, self.rk,
                  self.lost, self.tied, self.hooked, self.fired, self.first_task):
            c.clear()
