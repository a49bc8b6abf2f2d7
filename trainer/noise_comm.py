"""GradientNoise under DistributedDataParallel without a collective of its own on the step's critical path.

Each rank's noise sums (per-example terms, local micro-batch norms) have to be added up over the ranks.
A separate `all_reduce` in `GradientNoise.step()` is one more rendezvous of every rank per step: on a
busy machine that wait, not the arithmetic, is what measuring costs (bench/bench_ddp.py: 2 gloo ranks,
~0.7 ms per extra collective). Instead this DDP communication hook does what DDP's default hook does
(divide the bucket by the world size, one async all-reduce), and the step's last bucket carries the sums
appended to its gradients: one collective, as without measuring. By then every rule and parameter hook
of the backward has run: buckets are reduced in order, and a layer's rule runs before its parameters'
gradients exist. DDP waits on the bucket before its backward returns, so `step()` finds the sums there.

The sums are reduced per micro-batch and before the step's loss scales are known, so what travels is
raw: per micro-batch m, sizes[m]^2 * sum of the per-example terms and the sum of squared micro-batch
norms; GradientNoise._reduced weighs them into the same means as the direct path (`_stats`).

Parameters without a per-example rule need no hook of their own here: each bucket, before its
all-reduce, holds this rank's local gradient (all its micro-batches), so one norm of the bucket (or of
those parameters' views in it) is each rank's small batch. That holds while DDP reduces once per step
(K = 1, or accumulation under `no_sync()`); a second all-reduce in a step voids it (`_Step.rk_void`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.noise_stats import weighted_sum


class PendingSums:
    """The per-micro-batch sums of one step, in flight (or reduced) over the process group."""

    __slots__ = ("k", "packed", "work", "sized")

    def __init__(self, k: int, packed: torch.Tensor, work, sized: bool) -> None:
        self.k, self.packed, self.work, self.sized = k, packed, work, sized

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Added over the ranks: (2, k), row 0 the per-example sums and row 1 the micro-batch sums; and the
        ranks' local |gradient|^2 from the buckets (a 0-d tensor)."""
        if self.work is not None:
            self.work.wait()  # a c10d Work, or the Future that unpacks the last bucket
            self.work = None
        return self.packed[:2 * self.k].view(2, self.k), self.packed[2 * self.k]

    def examples(self) -> torch.Tensor:
        """The ranks' examples this step, added up (negative when a rank could not count its own)."""
        self.result()
        return self.packed[2 * self.k + 1]


def per_micro(terms: list[torch.Tensor], micro: list[int], k: int, squared: bool,
              like: torch.Tensor) -> torch.Tensor:
    """(k,) float32: sum over the terms of micro-batch m (counted from 1) of x (x^2 with squared=True)."""
    keep = [(t, m) for t, m in zip(terms, micro, strict=True) if 0 < m <= k]
    if not keep:
        return torch.zeros(k, device=like.device)
    v = torch.stack([t for t, _ in keep]).float()
    if squared:
        v = v * v
    if k == 1:
        return v.sum().reshape(1)
    return torch.zeros(k, device=v.device).index_add_(0, torch.tensor([m - 1 for _, m in keep],
                                                                     device=v.device), v)


def raw_sums(cur) -> tuple[torch.Tensor, int, bool]:
    """`cur`'s (trainer/noise.py `_Step`) sums as one float32 vector (2 k + 2): per micro-batch the
    per-example sums (times the local size squared when the forward hook counted every size: `sized`),
    then the micro-batch sums, then the buckets' local |gradient|^2, then the rank's examples (-1 when not
    counted; their sum over the ranks tells whether the ranks' batches were equal). A rank with no forward
    counted sends zeros (k = 1)."""
    k = max(cur.micro, 1)
    sized = len(cur.sizes) >= k and all(cur.sizes[:k])
    like = cur.pe[0] if cur.pe else cur.mb[0] if cur.mb else cur.rk[0] if cur.rk else torch.zeros(())
    pe = per_micro(cur.pe, cur.pe_micro, k, False, like)
    if cur.pe and sized:
        pe = pe * torch.tensor([float(s) ** 2 for s in cur.sizes[:k]], device=pe.device)
    mb = per_micro(cur.mb, cur.mb_micro, k, True, like)
    if not cur.rk:
        rk = torch.zeros(1, device=pe.device)
    else:
        rk = (cur.rk[0] if len(cur.rk) == 1 else torch.stack(cur.rk).sum()).reshape(1).float()
    n = torch.full((1,), float(sum(cur.sizes[:k])) if sized else -1.0, device=pe.device)  # a fill, no host copy
    return torch.cat([pe, mb, rk, n]), k, sized


def local_sq(noise, bucket) -> torch.Tensor | None:
    """This rank's |local gradient|^2 over the bucket's parameters that `noise` measures by ranks (float32;
    None when it has none): the whole flat buffer when they are all of it, else their views' norms."""
    params = bucket.parameters()
    key = (bucket.index(), tuple(map(id, params)))  # DDP rebuilds its buckets after the first step
    plan = noise.bucket_plans.get(key)
    if plan is None:
        idx = [i for i, p in enumerate(params) if id(p) in noise._rk_ids]
        plan = noise.bucket_plans[key] = "all" if len(idx) == len(params) else idx
    if plan == "all":
        buf = bucket.buffer()
        return torch.dot(buf, buf).float() if buf.dtype in (torch.float32, torch.float64) else \
            torch.linalg.vector_norm(buf, dtype=torch.float32).square()
    if not plan:
        return None
    grads = bucket.gradients()
    norms = torch._foreach_norm([grads[i] for i in plan])
    norms = torch.stack(norms).float() if len(norms) > 1 else norms[0].reshape(1).float()
    return torch.dot(norms, norms)


def make_hook(noise):
    """The DDP communication hook for `noise` (a GradientNoise): DDP's default all-reduce of the bucket
    (divided by the world size); the last bucket carries the noise sums appended to its gradients, so they
    are added up over the ranks in the same collective, and are in place when DDP's backward returns."""
    group = noise.group if noise.group is not None else dist.group.WORLD

    def reduce(buf: torch.Tensor):
        """DDP's default hook: the bucket's mean over the ranks."""
        return dist.all_reduce(buf.div_(noise.world), group=group, async_op=True).get_future().then(
            lambda f: f.value()[0])

    def hook(state, bucket):
        buf = bucket.buffer()
        if not noise.active:
            return reduce(buf)
        cur = noise._cur
        if noise._rk_ids:
            if cur.synced:  # a second all-reduce this step: the bucket holds reduced + local gradients
                cur.rk_void = True
            elif (sq := local_sq(noise, bucket)) is not None:
                cur.rk.append(sq)
        if not bucket.is_last():
            return reduce(buf)
        cur.synced = True
        sums, k, sized = raw_sums(cur)
        if buf.dtype not in (torch.float32, torch.float64) or buf.device != sums.device:
            # half-precision buckets would round the sums: they get their own (async) all-reduce
            cur.comm = PendingSums(k, sums, dist.all_reduce(sums, group=group, async_op=True), sized)
            return reduce(buf)
        n = buf.numel()
        packed = torch.cat([buf.view(-1).div_(noise.world), sums.to(buf.dtype)])
        pending = cur.comm = PendingSums(k, None, None, sized)

        def unpack(f):
            out = f.value()[0]
            buf.view(-1).copy_(out[:n])
            pending.packed = out[n:]
            return buf

        # DDP waits on this future before its backward returns
        pending.work = fut = dist.all_reduce(packed, group=group, async_op=True).get_future().then(unpack)
        return fut

    return hook


def reduced_means(pending: PendingSums, sizes: list[float], scales: list[float], b_big: float, k: int, world: int,
                  pe: bool, mb: bool, rk: bool) -> list[torch.Tensor]:
    """The means from the ranks' per-micro-batch raw sums: the same weights as GradientNoise's direct path;
    the local sizes were applied on each rank unless the forward could not count them. The ranks' local
    |gradient|^2 comes back as their mean, still in the loss's scale."""
    rows, rk_sum = pending.result()
    n = rows.shape[1]
    sc = [scales[min(m, len(scales) - 1)] for m in range(n)]
    sz = [1.0 if pending.sized else float(sizes[min(m, len(sizes) - 1)]) ** 2 for m in range(n)]
    out = []
    if pe:
        out.append(weighted_sum(rows[0], [z / (s * s * b_big) for s, z in zip(sc, sz, strict=True)]))
    if mb:
        out.append(weighted_sum(rows[1], [1.0 / (s * s * k * world) for s in sc]))
    if rk:
        out.append(rk_sum / world)
    return out
