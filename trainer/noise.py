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
  `.grad` after backward is the all-reduced one; the ranks' sums ride in the last gradient bucket's
  all-reduce (a DDP communication hook, trainer/noise_comm.py), so measuring adds no collective. Under
  that hook, parameters without a rule are read off the buckets (each rank's local gradient), no hook each.

Parameters are measured by the first method that applies; a layer the per-example rules do not cover
(nn.MultiheadAttention's packed projections, tied weights, a layer called twice in one forward, an
input without the batch dimension) falls back to the micro-batch method. With one micro-batch on one
device those parameters have no small batch: `stats.complete` is False and the estimate covers the
other parameters only (the built-in trainer then splits the batch in two). The blocks' unbiased
|G|^2 and tr(Sigma) add up, so a mixed step is reported as per-example-equivalent ingredients
(b_small = 1, g_small_sq = |G|^2 + tr(Sigma)); g_big_sq is always the measured |g_big|^2.

Mixed precision: under `torch.autocast` the rules sum half-precision output gradients in float32; with a
GradScaler call `gns.step(loss_scale=scaler.get_scale() / K)` before `scaler.unscale_` (the hooks and
`.grad` then hold the same scaled gradients, and the scale divides out).

Assumptions, as in every published estimator: the batch dimension is dim 0, micro-batches are
weighted by their share of the examples (`loss / K` for equal ones; pass `loss_scale` otherwise),
nothing mixes examples within a batch (no batch norm), and the norms are of the unclipped gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainer.noise_comm import make_hook, reduced_means
from trainer.noise_fsdp import mesh_group, shard_sq, sharding_mesh
from trainer.noise_hooks import LayerHooks
from trainer.noise_stats import NoiseStats, _sq_norm, _Step, _weighted
from trainer.per_example import register_rule, rule_for, tied_pairs

__all__ = ["GradientNoise", "NoiseStats", "register_rule"]


class GradientNoise(LayerHooks):
    """Attach to a model; `step()` after the backward passes of each optimizer step returns NoiseStats.

    per_example: use per-example norms for the layers that have a rule (default). False measures every
    parameter by micro-batches / ranks (cheaper in Python hooks, noisier: b_small = B/K).
    warn: say once (RuntimeWarning) when a step has parameters without a small batch.
    sketch: k > 0 estimates the weights' part of sequence Linear layers and convolutions from k random
    projections per example (unbiased; trainer/per_example.py `sketch_sq`) where that is cheaper than the
    exact Gram form: O(T k) instead of O(T^2) per example, for a little extra variance.
    comm_hook: on a DDP wrapper without a communication hook of its own, register one (DDP's default
    all-reduce, plus the noise sums behind the last bucket: trainer/noise_comm.py), so that `step()` adds
    no rendezvous of its own. DDP takes one hook per model: register yours before this (then the sums
    get their own all-reduce in `step()`), or pass False.
    accumulation: whether steps accumulate 2+ micro-batches. Under that comm hook, parameters without a
    per-example rule are measured by ranks (each rank's local gradient, read off DDP's buckets: no hook
    per parameter) unless True (micro-batch hooks: more small batches). None: by ranks until a step shows
    2+ micro-batches, by micro-batches from the next step on; False: by ranks whatever K (a loop that lets
    DDP all-reduce every micro-batch still moves to hooks: its buckets do not hold local gradients).

    Cost, per step: one forward hook and one gradient pre-hook per covered layer, whose rule costs a few
    fused reductions (the Gram form of sequence layers a batched matmul); one tensor hook per other
    parameter and micro-batch, whose work is one norm; in `step()`, one fused norm over `.grad` and a
    stack. Covered layers' parameters carry no hook at all unless the layer falls back at run time.
    """

    def __init__(self, model: nn.Module, per_example: bool = True, process_group=None, warn: bool = True,
                 comm_hook: bool = True, sketch: int = 0, accumulation: bool | None = None):
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.module = model.module if self.ddp else model
        self.group = process_group if process_group is not None else getattr(model, "process_group", None)
        # A DDP wrapper, or a bare module with the group its gradients are all-reduced over (a framework
        # that keeps the wrapper to itself): each rank's hooks see its local gradient, .grad the reduced one.
        self.world = dist.get_world_size(self.group) if self.ddp or process_group is not None else 1
        # FSDP2: the hooks see each rank's local batch as under DDP; .grad holds shards (trainer/noise_fsdp.py)
        mesh = None if self.ddp else sharding_mesh(self.module)
        self.sharded = mesh is not None
        if self.sharded:
            self.world, self.group = mesh_group(mesh, process_group)
        self.active = True
        self._cur, self._spare = _Step(), _Step()
        self._handles: list = []
        self._warned: set[str] = set() if warn else {"missing", "resync"}
        self._plans: dict = {}
        sparse = [n for n, m in self.module.named_modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad]
        if sparse:  # |g_big|^2 and the hooks' norms are dense reductions; refused here, not mid-backward
            raise ValueError(f"GradientNoise: sparse gradients are not supported ({sparse[0]!r} has sparse=True); "
                             "use sparse=False")
        # parameters DDP was told to ignore are not reduced over the ranks: not data-parallel, not measured
        ignored = set(getattr(model, "parameters_to_ignore", ()) or ()) if self.ddp else set()
        params = {id(p): (n, p) for n, p in self.module.named_parameters() if p.requires_grad and n not in ignored}
        self._names = {pid: n for pid, (n, _) in params.items()}
        self._by_id = {pid: p for pid, (_, p) in params.items()}
        self.covered: dict[str, str] = {}  # module name -> layer type, for the docs and the user
        owners: dict[int, int] = {}
        for _, m in self.module.named_modules(remove_duplicate=False):
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        skip = tuple(n + "." for n, m in self.module.named_modules() if isinstance(m, nn.MultiheadAttention))
        self._module_params: dict[int, list[int]] = {}  # covered module id -> its parameters
        self._module_names: dict[int, str] = {}
        # an Embedding and a Linear head sharing one weight (GPT-2, nanoGPT, BERT): both covered, plus a cross term
        pairs = tied_pairs(self.module, owners, sketch) if per_example else {}
        self._partner: dict[int, int] = {}  # covered module id -> the one its weight is tied to
        if per_example:
            for name, m in self.module.named_modules():
                rule = rule_for(m, sketch)
                own = [id(p) for p in m.parameters(recurse=False) if p.requires_grad]
                if (rule is None or not own or name.startswith(skip)
                        or any(owners[i] > 1 and pairs.get(i, ()).count(m) != 1 for i in own)
                        or any(i not in params for i in own)):
                    continue
                for i in own:
                    if i in pairs:
                        e, h = pairs[i]
                        self._partner[id(e)], self._partner[id(h)] = id(h), id(e)
                self.covered[name] = type(m).__name__
                self._module_params[id(m)] = own
                self._module_names[id(m)] = name
                self._handles.append(m.register_forward_hook(self._forward_hook(rule)))
        self._handles.append(self.module.register_forward_pre_hook(self._root_hook, with_kwargs=True))
        # once, after the first recorded forward: a covered weight also used outside its layer (tied functionally)
        self._audit = self.module.register_forward_hook(self._audit_uses) if self._module_params else None
        self._owners = owners
        for mid, other in list(self._partner.items()):  # a tied weight is measured by both of its layers or neither
            if other not in self._module_params and mid in self._module_params:
                del self._module_params[mid]
                self.covered.pop(self._module_names.pop(mid), None)
            if other not in self._module_params:
                self._partner.pop(mid, None)
        self._pe_ids = {i for own in self._module_params.values() for i in own}  # measured per example
        self._mb_ids: set[int] = set()  # measured by micro-batches (a tensor hook on the parameter)
        self._rk_ids: set[int] = set()  # measured by ranks, from DDP's buckets (no hook on the parameter)
        self._rk_next: set[int] = set()  # fell back part-way through this step: join _rk_ids after it
        self._unhooked: set[int] = set()  # no rule and no hook that sees their small batch (FSDP2): missing
        self.bucket_plans: dict = {}  # noise_comm.py's per-bucket choice of _rk_ids' gradients
        self.comm_hook = bool(comm_hook and self.ddp and self.world > 1 and not getattr(model, "_comm_hooks", None))
        # Under our comm hook the un-ruled parameters' small batch is each rank's local gradient, read off
        # the bucket before its all-reduce: no hook per parameter. A step with 2+ micro-batches switches
        # them to micro-batch hooks (more small batches) from the next step on (`_unbucket`).
        self._by_bucket, self._switch = self.comm_hook and not accumulation, accumulation is None
        for pid in params:
            if pid not in self._pe_ids:
                self._hook_param(pid)
        self._params = [p for _, p in params.values()]
        if self.comm_hook:
            model.register_comm_hook(None, make_hook(self))

    def per_example_share(self) -> float:
        """Share of the trainable parameter elements measured by per-example norms (1.0: every layer is
        covered, so one micro-batch on one device is a complete measurement)."""
        total = sum(p.numel() for p in self._by_id.values())
        return sum(self._by_id[i].numel() for i in self._pe_ids) / total if total else 0.0

    @property
    def fallback(self) -> tuple[str, ...]:
        """Parameters measured by micro-batches or ranks: no rule, or their layer fell back at run time."""
        other = self._mb_ids | self._rk_ids | self._rk_next
        return tuple(self._names[i] for i in self._by_id if i in other)

    # --- the step ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget what was collected (e.g. after a skipped, non-finite step)."""
        self._between_steps(self._cur)
        self._cur.clear()

    def _between_steps(self, cur: _Step) -> None:
        """What changes only from one step to the next: layers that fell back part-way through `cur` join
        the ranks' block; a step with 2+ micro-batches (unless accumulation=False), or whose buckets were
        voided, moves that block to micro-batch hooks."""
        for pid in self._rk_next:
            self._hook_param(pid)
        self._rk_next.clear()
        if self._by_bucket and ((cur.micro > 1 and self._switch) or cur.rk_void):
            self._unbucket()

    def step(self, loss_scale: float | Sequence[float] | None = None, micro_batches: int | None = None,
             examples: int | None = None) -> NoiseStats:
        """The ingredients of the gradients accumulated since the last call; call it once per optimizer step.
        Under DDP or FSDP it may all-reduce a few scalars: call it on every rank (one rank alone waits for ever).

        loss_scale: the factor each micro-batch's mean loss was multiplied by before `backward()`
        (default 1/K, i.e. `loss / K`; with a GradScaler, times `scaler.get_scale()`), one per
        micro-batch if they differ. micro_batches / examples override what the forward hook counted
        (forward passes with grad enabled, and dim 0 of the first tensor argument), per rank.
        """
        cur = self._cur
        self._cur, self._spare = self._spare, cur  # the hooks now fill the other one
        try:
            return self._stats(cur, loss_scale, micro_batches, examples)
        finally:
            self._between_steps(cur)
            cur.clear()

    def _unbucket(self) -> None:
        """Measure the un-ruled parameters by micro-batch hooks from now on (sticky): the loop accumulates
        micro-batches, whose gradients the buckets (one rank's sum) no longer show apart."""
        self._by_bucket = False
        ids, self._rk_ids = self._rk_ids, set()
        self.bucket_plans.clear()
        self._plans.clear()
        for pid in ids:
            self._hook_param(pid)

    def _stats(self, cur: _Step, loss_scale, micro_batches, examples) -> NoiseStats:
        k = micro_batches or cur.micro
        if k == 0:
            return NoiseStats(None, None, None, None, complete=False)
        sizes = cur.sizes[:k]
        if len(sizes) < k or not all(sizes):
            sizes = None
        local = examples or (sum(sizes) if sizes else None)
        if local is None:
            raise ValueError("GradientNoise.step() could not tell the batch size: pass examples=")
        if sizes is None:
            sizes = [local / k] * k
        if loss_scale is None:
            scales = [1.0 / k] * k
        elif isinstance(loss_scale, Sequence):
            scales = [float(s) for s in loss_scale]
        else:
            scales = [float(loss_scale)] * k
        if len(scales) != k:
            raise ValueError(f"loss_scale has {len(scales)} entries for {k} micro-batches")
        b_big = float(local * self.world)
        mb_small = k > 1 or self.world > 1  # the micro-batch method needs two batch sizes
        by_ranks = cur.comm is not None and not cur.rk_void  # this step's buckets showed local gradients
        key = (tuple([p.grad is not None for p in self._params]), mb_small, frozenset(cur.lost), by_ranks)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(mb_small, cur.lost, by_ranks)
        if (len(cur.fired) < len(cur.hooked) or not cur.hooked and plan[0]) and self._silent_layers(cur):
            key = (key[0], mb_small, frozenset(cur.lost), by_ranks)
            plan = self._plans[key] = self._plan(mb_small, cur.lost, by_ranks)
        pe_params, mb_params, rk_params, names, missing = plan

        # local sums, scaled back to per-example / per-micro-batch mean-loss gradients, divided by the
        # global counts (examples; micro-batches x ranks): means
        ranks_examples = None  # all ranks' examples, on the device: as_dict() checks b_big against it
        if cur.comm is not None:  # reduced over the ranks behind the gradients (noise_comm.py)
            sums = reduced_means(cur.comm, sizes, scales, b_big, k, self.world, bool(pe_params), bool(mb_params),
                                 bool(rk_params))
            ranks_examples = cur.comm.examples()
        else:
            sums = []
            if pe_params:
                sums.append(_weighted(cur.pe, cur.pe_micro, [(sizes[m] / scales[m]) ** 2 / b_big for m in range(k)],
                                      squared=False, like=pe_params[0]))
            if mb_params:
                sums.append(_weighted(cur.mb, cur.mb_micro, [1.0 / (scales[m] ** 2 * k * self.world) for m in range(k)],
                                      squared=True, like=mb_params[0]))
            if self.sharded:  # .grad holds this rank's shards: their part of each block's |g_big|^2 goes along
                bigs = [shard_sq([p.grad for p in ps], self.world) for ps in (pe_params, mb_params) if ps]
                sums += [b.to(sums[0].dtype if sums else b.dtype) for b in bigs]
            if self.world > 1 and sums:  # one extra collective of a few scalars (no DDP hook of ours)
                n = torch.full((), float(local), dtype=sums[0].dtype, device=sums[0].device)  # a fill, no host copy
                packed = torch.stack([*sums, n])
                dist.all_reduce(packed, group=self.group)
                *sums, ranks_examples = packed.unbind()
        if cur.rk_void and "resync" not in self._warned:
            self._warned.add("resync")
            warnings.warn("GradientNoise: DDP all-reduced the gradients more than once in one step (accumulate "
                          "under model.no_sync() but for the last micro-batch); parameters without a per-example "
                          "rule have no small batch this step, and are measured by micro-batches from the next",
                          RuntimeWarning, stacklevel=3)
        elif missing and "missing" not in self._warned:
            self._warned.add("missing")
            why = ("no per-example rule, and under FSDP no hook sees their per-rank gradient" if self.sharded else
                   "one micro-batch on one device and no per-example rule; run 2+ micro-batches")
            warnings.warn(f"GradientNoise: no small batch for {len(missing)} parameter(s) ({missing[:3]}...): {why}",
                          RuntimeWarning, stacklevel=3)
        big_scale = 1.0 / sum(scales) ** 2
        if self.sharded:  # the all-reduced shard sums, behind the small batches' sums
            bigs = sums[len(sums) // 2:]
            del sums[len(sums) // 2:]

            def big(params):
                return bigs.pop(0) * big_scale
        else:
            def big(params):
                return _sq_norm([p.grad for p in params], big_scale)
        blocks = []  # (|g_small|^2, b_small, |g_big|^2) per method
        if pe_params:
            blocks.append((sums.pop(0), 1.0, big(pe_params)))
        if mb_params:
            bs = k / sum(1.0 / s for s in sizes)  # harmonic mean: E mean_k |g_k|^2 = |G|^2 + tr * mean 1/b_k
            blocks.append((sums.pop(0), bs, big(mb_params)))
        if rk_params:  # each rank's local gradient (all its micro-batches) is one small batch
            blocks.append((sums.pop(0) * big_scale, float(local), _sq_norm([p.grad for p in rk_params], big_scale)))
        if not blocks:
            if cur.pe and "stale" not in self._warned:  # the hooks ran, but none of our parameters has a gradient
                self._warned.add("stale")
                warnings.warn("GradientNoise: the layers were measured but no parameter it holds has a gradient: "
                              "were the parameters replaced after it was attached (e.g. by fully_shard)? "
                              "Attach GradientNoise after wrapping the model", RuntimeWarning, stacklevel=3)
            return NoiseStats(None, None, None, None, False, *names, micro_batches=k, examples=int(b_big))
        if len(blocks) == 1:
            g_small, b_small, g_big = blocks[0]
        else:  # per-example-equivalent ingredients of the summed blocks: the unbiased |G|^2 and tr add up
            g_sq = sum((b_big * gb - bs * gs) / (b_big - bs) for gs, bs, gb in blocks)
            tr = sum((gs - gb) / (1.0 / bs - 1.0 / b_big) for gs, bs, gb in blocks)
            b_small = min(bs for _, bs, _ in blocks)
            g_small, g_big = g_sq + tr / b_small, sum(gb for _, _, gb in blocks)
        return NoiseStats(g_small, float(b_small), g_big, b_big, not missing, *names, micro_batches=k,
                          examples=int(b_big), ranks_examples=ranks_examples)

    def _plan(self, mb_small: bool, lost: set[int], by_ranks: bool) -> tuple:
        """Which parameters each method covers for a given set of gradients (cached: the same every step);
        without `by_ranks` (no bucket showed a local gradient) those measured by ranks have no small batch."""
        with_grad = [i for i, p in self._by_id.items() if p.grad is not None]
        pe = [i for i in with_grad if i in self._pe_ids]
        mb = [i for i in with_grad if i in self._mb_ids and i not in lost]
        rk = [i for i in with_grad if i in self._rk_ids and i not in lost]
        missing = [i for i in with_grad if i in lost or i in self._unhooked]
        if not mb_small:
            missing, mb = missing + mb, []
        if not by_ranks:
            missing, rk = missing + rk, []
        names = tuple(tuple(self._names[i] for i in g) for g in (pe, mb + rk, missing))
        return *([self._by_id[i] for i in g] for g in (pe, mb, rk)), names, names[2]

    def close(self) -> None:
        """Remove every hook (a DDP communication hook cannot be removed: it goes back to DDP's default)."""
        self.active = False
        if self._audit is not None:
            self._audit.remove()
            self._audit = None
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> GradientNoise:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
