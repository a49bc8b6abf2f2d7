"""The noise scale Adam sees: B_simple of the preconditioned gradient P g, with P = 1/(sqrt(v_hat) + eps).

Adam's update is (roughly) -lr * P m, so the noise that matters for its batch-size tradeoff is that of
P g, not g: directions with a small second moment are amplified, and B_simple measured on raw gradients
can differ from Adam's by a large factor. adaptdl's AdamGradientNoiseScale measures the same thing; as
there, P comes from the optimizer's own state (the bias-corrected exp_avg_sq of the *previous* step,
i.e. the one this step's update will start from), it is frozen for the step, and nothing is measured in
the first ADAM_WARM_STEPS steps, whose v_hat rests on a handful of gradients. Coordinates whose v_hat is
still exactly 0 (never had a gradient) get weight 0; coordinates seen rarely keep their large weight,
which is what Adam does to them.

The ingredients are the plain estimator's (trainer.gns.unbiased_estimates) in the metric P^2:
|P g_small|^2 averaged over micro-batches and |P g_big|^2 of the step's mean gradient. Per-example norms
do not carry over (for a sequence layer the weighted norm no longer factors into input and output
gradient norms), so they come from micro-batches: tensor hooks on the parameters see each micro-batch's
contribution to the gradient as autograd produces it and keep one weighted dot product, no copy. The
built-in trainer therefore runs every ADAM_SPLIT_EVERY-th step at --accum 1 as 2 micro-batches, and every
step with --accum K >= 2. Under DDP the hooks see each rank's local micro-batches: every rank's are small
batches (one per rank is enough, so no split), their sums are all-reduced (K + 1 scalars, on measured steps
only), and `.grad`, already all-reduced, is the big batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from collector import signals
from trainer.gns import BSimpleEMA

ADAM_WARM_STEPS = 5  # as adaptdl: v_hat over fewer steps is too noisy to precondition with
ADAM_SPLIT_EVERY = 10  # --accum 1: measure on every 10th step (a 2-way split costs ~1.4-2x that step)
COLUMNS = ("g_small_sq_adam", "b_small_adam", "g_big_sq_adam", "b_big_adam")


def adam_weights(opt: torch.optim.Optimizer) -> dict[int, torch.Tensor] | None:
    """P^2 = 1/(sqrt(v_hat) + eps)^2 per parameter (keyed by id), from Adam/AdamW state; None while warming."""
    out: dict[int, torch.Tensor] = {}
    for group in opt.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = opt.state.get(p)
            if not state or "exp_avg_sq" not in state:
                return None
            t = float(state["step"])
            if t < ADAM_WARM_STEPS:
                return None
            v_hat = state["exp_avg_sq"] / (1.0 - beta2**t)
            # a coordinate that never had a gradient (an embedding row of a byte not seen yet) has no
            # preconditioner: 1/eps^2 = 1e16 would let one first sighting swamp the whole sum
            out[id(p)] = torch.where(v_hat > 0, (v_hat.sqrt() + eps).reciprocal().square(), 0.0)
    return out


def split_sizes(batch: int, n_micro: int) -> list[int]:
    """Micro-batch sizes of `tensor_split(n_micro)` on a batch of `batch` examples."""
    return [batch // n_micro + (1 if k < batch % n_micro else 0) for k in range(n_micro)]


@dataclass
class AdamNoiseStats:
    """One step's preconditioned ingredients (0-d device tensors) and the batch sizes."""

    g_small_sq: torch.Tensor  # mean over micro-batches of |P g_k|^2
    b_small: float  # harmonic mean of the micro-batch sizes
    g_big_sq: torch.Tensor  # |P g_big|^2
    b_big: float


class AdamNoise:
    """Hooks on `model`'s parameters that measure the preconditioned ingredients while active.

        an = AdamNoise(model)
        if an.begin(opt):                       # P frozen from opt's state; False while Adam warms up
            ... K micro-batch backward passes of (loss_k * w_k) ...
            stats = an.step(sizes)              # before clipping and opt.step()
    """

    def __init__(self, model: nn.Module, world: int = 1, group=None):
        """`model`: the bare module (under DDP its hooks then see the rank's local gradients); `world`: the
        ranks its gradients are all-reduced over (in `group`)."""
        self.world, self.group = world, group
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._w: dict[int, torch.Tensor] | None = None
        self._calls: dict[int, list[torch.Tensor]] = {}
        self._handles = [p.register_hook(self._hook(p)) for p in self.params]

    def _hook(self, p: torch.Tensor):
        pid = id(p)

        def hook(g: torch.Tensor) -> None:
            if self._w is not None:
                self._calls.setdefault(pid, []).append(torch.sum(g.detach().square() * self._w[pid]))

        return hook

    @property
    def active(self) -> bool:
        return self._w is not None

    def begin(self, opt: torch.optim.Optimizer) -> bool:
        """Freeze P from the optimizer's state for this step; False (and inactive) while Adam warms up."""
        self._w = adam_weights(opt)
        self._calls = {}
        return self._w is not None

    def step(self, sizes: Sequence[int]) -> AdamNoiseStats | None:
        """The ingredients of the step whose (this rank's) micro-batches had these sizes (loss_k weighted by
        size/B, B this rank's examples).

        Each hook call k saw w_k g_k with w_k = b_k / B, so |P g_k|^2 = (that sum) / w_k^2. None when
        inactive, with fewer than 2 small batches (micro-batches x ranks), or when a parameter saw another
        number of passes (on any rank: every rank takes part in the all-reduce either way).
        """
        w, calls = self._w, self._calls
        self._w, self._calls = None, {}
        k = len(sizes)
        if w is None or k * self.world < 2:  # the same on every rank (the optimizer states agree)
            return None
        ok = bool(calls) and all(len(c) == k for c in calls.values())
        total = float(sum(sizes))
        if ok:
            per_micro = torch.stack([sum(c[j] for c in calls.values()) * (total / b) ** 2 for j, b in enumerate(sizes)])
        else:
            per_micro = torch.zeros(k, device=self.params[0].device)
        if self.world > 1:
            packed = torch.cat([per_micro.float(), torch.tensor([float(ok)], device=per_micro.device)])
            dist.all_reduce(packed, group=self.group)
            ok, per_micro = bool(packed[-1].item() == self.world), packed[:-1]
        if not ok:
            return None
        big = sum(torch.sum(p.grad.detach().square() * w[id(p)]) for p in self.params if p.grad is not None)
        b_small = k / sum(1.0 / b for b in sizes)
        return AdamNoiseStats(per_micro.sum() / (k * self.world), b_small, big, total * self.world)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class AdamNoiseLog:
    """Keeps each measured step's tensors on the device and logs them as scalars at the trainer's syncs:
    the four ingredients (COLUMNS) and `b_simple_adam`, a ratio of per-example EMAs as the plain one."""

    def __init__(self, window_examples: float):
        self.ema = BSimpleEMA(window_examples)
        self._rows: list[tuple[int, int, AdamNoiseStats]] = []
        self._last_examples = 0

    def add(self, step: int, examples: int, stats: AdamNoiseStats | None) -> None:
        if stats is not None:
            self._rows.append((step, examples, stats))

    def flush(self, run) -> None:
        """One host transfer for the pending rows, then `run.log` per row (host values only); a signal
        arriving meanwhile acts after it (its exception would drop the rows taken)."""
        with signals.deferred():
            self._flush(run)

    def _flush(self, run) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        vals = torch.stack([t for _, _, s in rows for t in (s.g_small_sq, s.g_big_sq)]).reshape(-1, 2)
        vals = vals.cpu().numpy().astype(np.float64)
        for (step, examples, s), (small, big) in zip(rows, vals.tolist(), strict=True):
            seen, self._last_examples = examples - self._last_examples, examples
            b = self.ema.update(small, s.b_small, big, s.b_big, seen)
            values = dict(zip(COLUMNS, (small, s.b_small, big, s.b_big), strict=True))
            if math.isfinite(b):
                values["b_simple_adam"] = b
            run.log(step, **values)
