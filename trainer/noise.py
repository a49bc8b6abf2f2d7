"""The gradient-noise-scale ingredients for any PyTorch training loop: `GradientNoise(model)`.

    gns = GradientNoise(model)                     # or a DistributedDataParallel-wrapped model
    for step, batch in enumerate(loader, 1):
        for xk, yk in micro_batches(batch, K):     # K = 1 is fine
            (loss_fn(model(xk), yk) / K).backward()
        stats = gns.step()                         # after backward, before clipping / optimizer.step()
        opt.step(); opt.zero_grad()
        run.log_step(step, **stats.as_dict())      # g_small_sq, b_small, g_big_sq, b_big

Where the two batch sizes come from (McCandlish et al. 2018, App. A), all from hooks, no gradient copy:

- per-example norms (B_small = 1): a forward hook keeps each covered layer's input, a hook on its
  output gradient turns (input, output gradient) into the sum of per-example squared norms
  (trainer/per_example.py: Linear, sequences, Embedding, LayerNorm, RMSNorm, Conv1d/2d);
- micro-batches (gradient accumulation): a hook on every other parameter sees each micro-batch's
  gradient as autograd produces it, before it is added into `.grad`, and keeps one dot product;
- DistributedDataParallel: the same hooks see each rank's *local* gradient (before DDP's all-reduce),
  `.grad` after backward is the all-reduced one; `step()` all-reduces two scalars, nothing else.

Parameters are measured by the first method that applies; a layer the per-example rules do not cover
(nn.MultiheadAttention's packed projections, tied weights, a layer called twice in one forward, an
input without the batch dimension) falls back to the micro-batch method. With one micro-batch on one
device those parameters have no small batch: `stats.complete` is False and the estimate covers the
other parameters only (the built-in trainer then splits the batch in two). The blocks' unbiased
|G|^2 and tr(Sigma) add up, so a mixed step is reported as per-example-equivalent ingredients
(b_small = 1, g_small_sq = |G|^2 + tr(Sigma)); g_big_sq is always the measured |g_big|^2.

Assumptions, as in every published estimator: the batch dimension is dim 0, micro-batches are
weighted by their share of the examples (`loss / K` for equal ones; pass `loss_scale` otherwise),
nothing mixes examples within a batch (no batch norm), and the norms are of the unclipped gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from trainer.per_example import rule_for

__all__ = ["GradientNoise", "NoiseStats"]


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
        return {"g_small_sq": float(self.g_small_sq), "b_small": float(self.b_small),
                "g_big_sq": float(self.g_big_sq), "b_big": float(self.b_big)}


@dataclass
class _Step:
    """What the hooks collected since the last `step()`."""

    micro: int = 0  # forward passes with grad enabled (= micro-batches)
    sizes: list[int] = field(default_factory=list)  # examples per micro-batch
    pe: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (micro, sum_i |contrib_i|^2 of a layer)
    mb: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (micro, |h_k|^2 of a parameter)
    pe_params: set[int] = field(default_factory=set)
    pe_now: set[tuple[int, int]] = field(default_factory=set)  # (micro, parameter) done per example
    mb_params: set[int] = field(default_factory=set)
    calls: dict[int, int] = field(default_factory=dict)  # covered module id -> calls in this forward
    shape: tuple[int, ...] | None = None  # shape of the model's first tensor input, this forward


def _recording() -> bool:
    """Grad enabled and not inside a torch.func transform (whose forwards are someone else's)."""
    return torch.is_grad_enabled() and torch._C._functorch.peek_interpreter_stack() is None


class GradientNoise:
    """Attach to a model; `step()` after the backward passes of each optimizer step returns NoiseStats.

    per_example: use per-example norms for the layers that have a rule (default). False measures every
    parameter by micro-batches / ranks (cheaper in Python hooks, noisier: b_small = B/K).
    warn: say once (RuntimeWarning) when a step has parameters without a small batch.
    """

    def __init__(self, model: nn.Module, per_example: bool = True, process_group=None, warn: bool = True):
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.module = model.module if self.ddp else model
        self.group = process_group if process_group is not None else getattr(model, "process_group", None)
        self.world = dist.get_world_size(self.group) if self.ddp else 1
        self.active = True
        self._cur = _Step()
        self._handles: list = []
        self._warned: set[str] = set() if warn else {"missing"}
        self._name_cache: dict = {}
        params = {id(p): (n, p) for n, p in self.module.named_parameters() if p.requires_grad}
        self._names = {pid: n for pid, (n, _) in params.items()}
        self.covered: dict[str, str] = {}  # module name -> layer type, for the docs and the user
        owners: dict[int, int] = {}
        for _, m in self.module.named_modules(remove_duplicate=False):
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        skip = tuple(n + "." for n, m in self.module.named_modules() if isinstance(m, nn.MultiheadAttention))
        self._module_params: dict[int, list[int]] = {}
        if per_example:
            for name, m in self.module.named_modules():
                rule = rule_for(m)
                own = [id(p) for p in m.parameters(recurse=False) if p.requires_grad]
                if rule is None or not own or name.startswith(skip) or any(owners[i] > 1 for i in own):
                    continue
                self.covered[name] = type(m).__name__
                self._module_params[id(m)] = own
                self._handles.append(m.register_forward_hook(self._forward_hook(rule)))
        self._handles.append(self.module.register_forward_pre_hook(self._root_hook, with_kwargs=True))
        for pid, (_, p) in params.items():
            self._handles.append(p.register_hook(self._param_hook(pid)))
        self._params = [p for _, p in params.values()]
        covered = {i for own in self._module_params.values() for i in own}
        self.fallback = tuple(self._names[i] for i in params if i not in covered)  # measured by micro-batches

    # --- hooks ---------------------------------------------------------------------------------

    def _root_hook(self, module, args, kwargs):
        if not (self.active and _recording()):
            return
        cur = self._cur
        cur.micro += 1
        cur.calls = {}
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        cur.sizes.append(0 if first is None else int(first.shape[0]))
        cur.shape = None if first is None else tuple(first.shape)

    def _forward_hook(self, rule):
        def hook(module, inputs, output):
            if not (self.active and _recording()) or not isinstance(output, torch.Tensor):
                return
            if not output.requires_grad or not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            cur, mid = self._cur, id(module)
            cur.calls[mid] = cur.calls.get(mid, 0) + 1
            if not self._has_batch_dim(module, inputs[0], cur):
                return  # e.g. positions embedded once and broadcast over the batch: micro-batch fallback
            micro, calls, a = cur.micro, cur.calls, inputs[0].detach()

            def on_grad(d: torch.Tensor) -> None:
                if cur is not self._cur or calls.get(mid, 0) != 1:
                    return  # called twice in one forward: per-example terms would miss cross terms
                sq = rule(module, a, d.detach())
                if sq is not None:
                    cur.pe.append((micro, sq))
                    own = self._module_params[mid]
                    cur.pe_params.update(own)
                    cur.pe_now.update((micro, i) for i in own)

            node = output.grad_fn  # a pre-hook on the node that consumes d costs less than a tensor hook
            if node is None:
                output.register_hook(on_grad)
            else:
                node.register_prehook(lambda grads: on_grad(grads[0]) if grads[0] is not None else None)
        return hook

    @staticmethod
    def _has_batch_dim(module: nn.Module, a: torch.Tensor, cur: _Step) -> bool:
        """dim 0 of the layer input is the batch. Embeddings must see the model input's own shape (token
        ids (N, T) or class ids (N,)), so positions (T,) with T == N are not taken for T examples."""
        if not cur.sizes or not cur.sizes[-1]:
            return True
        if isinstance(module, nn.Embedding) and cur.shape is not None:
            return tuple(a.shape) == cur.shape
        return a.dim() > 0 and a.shape[0] == cur.sizes[-1]

    def _param_hook(self, pid: int):
        def hook(g: torch.Tensor) -> None:
            cur = self._cur
            if not self.active or (cur.micro, pid) in cur.pe_now:
                return
            flat = g.detach().reshape(-1)
            if flat.dtype not in (torch.float32, torch.float64):
                flat = flat.float()
            cur.mb.append((cur.micro, torch.dot(flat, flat)))
            cur.mb_params.add(pid)
        return hook

    # --- the step ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget what was collected (e.g. after a skipped, non-finite step)."""
        self._cur = _Step()

    def step(self, loss_scale: float | Sequence[float] | None = None, micro_batches: int | None = None,
             examples: int | None = None) -> NoiseStats:
        """The ingredients of the gradients accumulated since the last call; call it once per optimizer step.

        loss_scale: the factor each micro-batch's mean loss was multiplied by before `backward()`
        (default 1/K, i.e. `loss / K`; with a GradScaler, times `scaler.get_scale()`), one per
        micro-batch if they differ. micro_batches / examples override what the forward hook counted
        (forward passes with grad enabled, and dim 0 of the first tensor argument), per rank.
        """
        cur, self._cur = self._cur, _Step()
        k = micro_batches or cur.micro
        if k == 0:
            return NoiseStats(None, None, None, None, complete=False)
        sizes = cur.sizes[:k] if len(cur.sizes) >= k and all(cur.sizes[:k]) else None
        local = examples or (sum(sizes) if sizes else None)
        if local is None:
            raise ValueError("GradientNoise.step() could not tell the batch size: pass examples=")
        if sizes is None:
            sizes = [local / k] * k
        scales = [1.0 / k] * k if loss_scale is None else (
            [float(loss_scale)] * k if not isinstance(loss_scale, Sequence) else [float(s) for s in loss_scale])
        if len(scales) != k:
            raise ValueError(f"loss_scale has {len(scales)} entries for {k} micro-batches")
        total_scale = sum(scales)
        b_big = float(local * self.world)

        with_grad = [p for p in self._params if p.grad is not None]
        by_id = {id(p): p for p in with_grad}
        pe_ids = [i for i in by_id if i in cur.pe_params]
        mb_ids = [i for i in by_id if i in cur.mb_params and i not in cur.pe_params]
        missing = [i for i in by_id if i not in cur.pe_params and i not in cur.mb_params]
        mb_small = k > 1 or self.world > 1  # the micro-batch method needs two batch sizes
        if not mb_small:
            missing, mb_ids = missing + mb_ids, []

        # local sums, scaled back to per-example / per-micro-batch mean-loss gradients
        sums = []  # already divided by the global counts (examples, micro-batches x ranks): means
        if pe_ids:
            sums.append(_combine(cur.pe, [(sizes[m] / scales[m]) ** 2 / b_big for m in range(k)]))
        if mb_ids:
            sums.append(_combine(cur.mb, [1.0 / (scales[m] ** 2 * k * self.world) for m in range(k)]))
        if self.world > 1 and sums:  # the one extra collective: a few scalars
            packed = torch.stack(sums)
            dist.all_reduce(packed, group=self.group)
            sums = list(packed.unbind())
        names = self._names_of(pe_ids, mb_ids, missing)
        if missing and "missing" not in self._warned:
            self._warned.add("missing")
            warnings.warn(f"GradientNoise: no small batch for {len(missing)} parameter(s) ({names[2][:3]}...): "
                          "one micro-batch on one device and no per-example rule; run 2+ micro-batches",
                          RuntimeWarning, stacklevel=2)
        big_scale = 1.0 / total_scale**2
        blocks = []  # (|g_small|^2, b_small, |g_big|^2) per method
        if pe_ids:
            blocks.append((sums.pop(0), 1.0, _sq_norm([by_id[i].grad for i in pe_ids], big_scale)))
        if mb_ids:
            bs = k / sum(1.0 / s for s in sizes)  # harmonic mean: E mean_k |g_k|^2 = |G|^2 + tr * mean 1/b_k
            blocks.append((sums.pop(0), bs,
                           _sq_norm([by_id[i].grad for i in mb_ids], big_scale)))
        if not blocks:
            return NoiseStats(None, None, None, None, False, *names, micro_batches=k, examples=int(b_big))
        if len(blocks) == 1:
            g_small, b_small, g_big = blocks[0]
        else:  # per-example-equivalent ingredients of the summed blocks: the unbiased |G|^2 and tr add up
            g_sq = sum((b_big * gb - bs * gs) / (b_big - bs) for gs, bs, gb in blocks)
            tr = sum((gs - gb) / (1.0 / bs - 1.0 / b_big) for gs, bs, gb in blocks)
            b_small = min(bs for _, bs, _ in blocks)
            g_small, g_big = g_sq + tr / b_small, sum(gb for _, _, gb in blocks)
        return NoiseStats(g_small, float(b_small), g_big, b_big, not missing, *names, micro_batches=k,
                          examples=int(b_big))

    def _names_of(self, *groups: list[int]) -> tuple[tuple[str, ...], ...]:
        key = tuple(tuple(g) for g in groups)
        got = self._name_cache.get(key)
        if got is None:
            got = self._name_cache[key] = tuple(tuple(self._names[i] for i in g) for g in groups)
        return got

    def close(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> GradientNoise:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _combine(terms: list[tuple[int, torch.Tensor]], weights: list[float]) -> torch.Tensor:
    """sum_j w[micro_j] x_j (micro-batches counted from 1), with one stack when the weights are equal."""
    terms = [(m, t) for m, t in terms if 0 < m <= len(weights)]
    if len(set(weights)) == 1:
        if len(terms) == 1:
            return terms[0][1] * weights[0]
        if len(terms) == 2:
            return torch.add(terms[0][1], terms[1][1]).mul_(weights[0])
        return torch.stack([t for _, t in terms]).sum().mul_(weights[0])
    return torch.stack([t * weights[m - 1] for m, t in terms]).sum()


def _sq_norm(grads: list[torch.Tensor], scale: float) -> torch.Tensor:
    """scale * |g|^2 over several tensors (torch's fused per-tensor norms, then one dot)."""
    norms = torch.stack(torch._foreach_norm(grads))
    if norms.dtype not in (torch.float32, torch.float64):
        norms = norms.float()
    sq = torch.dot(norms, norms)
    return sq if scale == 1.0 else sq * scale
